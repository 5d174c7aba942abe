"""Jinja2 environment for the HTML pages; autoescaping is on for every template."""

from __future__ import annotations

from pathlib import Path

from fastapi.templating import Jinja2Templates

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"

templates = Jinja2Templates(directory=TEMPLATES_DIR)
# Prompts and model outputs are untrusted; autoescape must hold for every extension we render.
templates.env.autoescape = True
