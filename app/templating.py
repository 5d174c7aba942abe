"""Jinja2 environment for the HTML pages (autoescaping on for every template), `render`, and the guidelines renderer."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
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


# Guidelines are Markdown written by admins and read by every labeler, so they are rendered by a maintained
# CommonMark parser (linear time, unlike the hand-written regexes it replaced) with raw HTML off: any tag in the
# text shows as text. Only http(s), mailto and same-site links become links, opened in a new tab without a
# window.opener or a Referer; images stay text (the CSP would block a remote one anyway).
GUIDELINES_MARKDOWN_CHARS = 20_000
_SAFE_LINK = re.compile(r"(?:https?:|mailto:|/(?!/)|#|\?)", re.IGNORECASE)


def _safe_link(url: str) -> bool:
    return bool(_SAFE_LINK.match(url.strip()))


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False, "typographer": False})
    md.disable("image")
    md.validateLink = _safe_link  # type: ignore[method-assign]

    def link_open(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        tokens[idx].attrSet("rel", "noopener noreferrer")
        tokens[idx].attrSet("target", "_blank")
        return renderer.renderToken(tokens, idx, options, env)

    def heading(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        # The page's own h1/h2 stay above the guidelines: '#' is an h3.
        tokens[idx].tag = f"h{min(int(tokens[idx].tag[1]) + 2, 6)}"
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("heading_open", heading)
    md.add_render_rule("heading_close", heading)
    return md


_MARKDOWN = _markdown()


@lru_cache(maxsize=16)
def render_guidelines(text: str) -> Markup:
    """Renders batch guidelines as Markdown without raw HTML; past GUIDELINES_MARKDOWN_CHARS, as plain text.

    The cap keeps a page's cost bounded whatever an admin pastes: the rest is shown escaped, not dropped.
    Rendered once per text and process (pages show the same guidelines again and again).
    """
    text = text or ""
    head, rest = text[:GUIDELINES_MARKDOWN_CHARS], text[GUIDELINES_MARKDOWN_CHARS:]
    if rest:
        # Cut at the last blank line before the cap, so no paragraph or list is split between the two parts.
        cut = head.rfind("\n\n")
        if cut > 0:
            head, rest = head[:cut], head[cut:] + rest
    html = _MARKDOWN.render(head)
    if rest:
        html += f'<p class="guidelines-plain">{escape(rest.strip())}</p>'
    return Markup(html)  # noqa: S704  markdown-it escapes all text and raw HTML is off; only its own tags are added
