"""Jinja2 environment for the HTML pages (autoescaping on for every template), `render`, and the guidelines renderer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"

templates = Jinja2Templates(directory=TEMPLATES_DIR)
# Prompts and model outputs are untrusted; autoescape must hold for every extension we render.
templates.env.autoescape = True


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """Writes a count with its noun in the right number: "1 prompt", "2 prompts", "0 prompts"."""
    return f"{count:,} {singular if count == 1 else (plural_form or singular + 's')}"


templates.env.filters["plural"] = plural


class Viewer(Protocol):
    """What a page needs of whoever is signed in (app.deps.Principal; named here, as app.deps imports this)."""

    @property
    def user(self) -> object: ...

    @property
    def csrf_token(self) -> str: ...


def render(
    request: Request, name: str, principal: Viewer | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """Renders a page with the signed-in user and their CSRF token in the context."""
    context.setdefault("user", principal.user if principal else None)
    context.setdefault("csrf_token", principal.csrf_token if principal else "")
    return templates.TemplateResponse(request, name, context, status_code=status_code)


_BOLD = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
_CODE = re.compile(r"`([^`]+)`")
_BULLET = re.compile(r"^\s*[-*]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,3})\s+(.*)$")


def _inline(line: str) -> str:
    # `line` is already escaped, so the only markup in the result is what these rules add.
    line = _CODE.sub(r"<code>\1</code>", line)
    line = _BOLD.sub(r"<strong>\1</strong>", line)
    return _ITALIC.sub(r"<em>\1</em>", line)


def render_guidelines(text: str) -> Markup:
    """Renders batch guidelines: escapes everything, then allows paragraphs, lists, headings, bold, italic, code."""
    html: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if paragraph:
            html.append("<p>" + "<br>".join(paragraph) + "</p>")
            paragraph.clear()
        if items:
            html.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
            items.clear()

    for raw in (text or "").splitlines():
        line = str(escape(raw.rstrip()))
        bullet, heading = _BULLET.match(line), _HEADING.match(line)
        if not line.strip():
            flush()
        elif heading:
            flush()
            level = len(heading.group(1)) + 2  # the page's own h1/h2 stay above the guidelines
            html.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif bullet:
            if paragraph:
                flush()
            items.append(_inline(bullet.group(1)))
        else:
            if items:
                flush()
            paragraph.append(_inline(line.strip()))
    flush()
    return Markup("\n".join(html))  # noqa: S704  every piece was escaped above; only our tags are added
