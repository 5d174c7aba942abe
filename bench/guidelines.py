"""Guidelines rendering on hostile Markdown: markdown-it-py (app.templating) against the regexes it replaced.

Usage: .venv/bin/python bench/guidelines.py [--quick]

The baseline is the hand-written renderer of before (copied below, unchanged), timed in the same run on the same
inputs: 40,000 characters of each hostile pattern (the size the security probe reported at 2.5 s), then a
megabyte for the new renderer alone (the old one would take minutes). Each time is the best of three runs in
fresh caches. Tests assert no timings; this is where they are measured.
"""

from __future__ import annotations

import argparse
import re
import time

from markupsafe import Markup, escape

from app.templating import render_guidelines

# --- the renderer before markdown-it-py (the baseline) ------------------------------------------

_BOLD = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
_CODE = re.compile(r"`([^`]+)`")
_BULLET = re.compile(r"^\s*[-*]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,3})\s+(.*)$")


def _inline(line: str) -> str:
    line = _CODE.sub(r"<code>\1</code>", line)
    line = _BOLD.sub(r"<strong>\1</strong>", line)
    return _ITALIC.sub(r"<em>\1</em>", line)


def old_render_guidelines(text: str) -> Markup:
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
            level = len(heading.group(1)) + 2
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
    return Markup("\n".join(html))  # noqa: S704  the baseline, as it was


# --- the measurement ----------------------------------------------------------------------------

PATTERNS = {"'** a' repeated": "** a", "'*a ' repeated": "*a ", "'[' repeated": "[", "'![' repeated": "!["}


def hostile(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def best_of(render, text: str, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        getattr(render, "cache_clear", lambda: None)()
        start = time.perf_counter()
        render(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 characters for the baseline, one run each")
    args = parser.parse_args()
    small, runs = (20_000, 1) if args.quick else (40_000, 3)
    print(f"| input | old regexes, {small:,} chars (s) | markdown-it-py (s) | old / new | markdown-it-py, 1 MB (s) |")
    print("|---|---|---|---|---|")
    for name, unit in PATTERNS.items():
        old = best_of(old_render_guidelines, hostile(unit, small), runs)
        new = best_of(render_guidelines, hostile(unit, small), runs)
        big = best_of(render_guidelines, hostile(unit, 1_000_000), runs)
        print(f"| {name} | {old:.3f} | {new:.3f} | {old / new:.2f} | {big:.3f} |")


if __name__ == "__main__":
    main()
