"""Finding 6: quadratic Markdown.

The hand-written regexes that rendered guidelines took seconds for 40 k
characters. Guidelines are now rendered by markdown-it-py with raw HTML off,
only safe links (opened with rel="noopener noreferrer") and a size cap past
which the text is shown plain. A megabyte of hostile input must render within
the test's timeout; bench/guidelines.py measures how fast (tests assert no
timings).
"""

from __future__ import annotations

import re

import pytest

from app.templating import render_guidelines

MEGABYTE = 1_000_000
# Inputs that make backtracking regexes or naive delimiter matching quadratic.
HOSTILE = ["*a ", "**a", "[", "[a](", "![", "`", "_a", "<", "*" * 7 + " ", "a *b* ", "\\", "> ", "- "]


@pytest.mark.parametrize("unit", HOSTILE)
def test_a_megabyte_of_hostile_markdown_renders(unit):
    text = (unit * (MEGABYTE // len(unit) + 1))[:MEGABYTE] + "\n\nTHE END <b>"
    html = str(render_guidelines(text))
    # Nothing is dropped: what lies past the Markdown cap is shown as escaped text.
    assert html.rstrip().endswith("THE END &lt;b&gt;</p>")
    assert "<b>" not in html and "<script" not in html


def test_links_are_safe_and_open_without_opener_or_referrer():
    html = str(
        render_guidelines(
            "See [the rules](https://example.org/rules) and [home](/label).\n\n"
            "[x](javascript:alert(1)) [y](//evil.example) [z](data:text/html,hi) <javascript:alert(2)>"
        )
    )
    links = re.findall(r"<a [^>]*>", html)
    assert links == [
        '<a href="https://example.org/rules" rel="noopener noreferrer" target="_blank">',
        '<a href="/label" rel="noopener noreferrer" target="_blank">',
    ]
    assert "javascript:" not in "".join(links) and "evil.example" not in "".join(links)


def test_raw_html_is_text_and_the_markdown_subset_still_works():
    html = str(
        render_guidelines(
            "# Rules\n**Be kind** and *brief*, use `code`.\n\n- one\n- <script>alert(1)</script>\n\n"
            "<img src=x onerror=alert(2)> 2 * 3 * 4\n\n![pixel](https://tracker.example/p.png)"
        )
    )
    assert "<h3>Rules</h3>" in html
    assert "<strong>Be kind</strong> and <em>brief</em>, use <code>code</code>." in html
    assert "<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>" in html
    assert "&lt;img src=x onerror=alert(2)&gt; 2 * 3 * 4" in html
    assert "<script" not in html and "<img" not in html
