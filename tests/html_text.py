"""Reads the text of page elements by their `data-testid`, so tests assert a cell rather than a substring anywhere."""

from __future__ import annotations

from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Texts(HTMLParser):
    def __init__(self, testid: str, within: str | None):
        super().__init__(convert_charrefs=True)
        self.testid, self.within = testid, within
        self.stack: list[tuple[str, str | None]] = []  # (tag, data-testid)
        self.open: list[list[str]] = []  # text collected per matching element still open
        self.found: list[str] = []

    def _inside(self) -> bool:
        return self.within is None or any(tid == self.within for _, tid in self.stack)

    def handle_starttag(self, tag, attrs):
        testid = dict(attrs).get("data-testid")
        if tag in VOID:
            if testid == self.testid and self._inside():
                self.found.append(dict(attrs).get("value") or "")
            return
        match = testid == self.testid and self._inside()
        self.stack.append((tag, testid if not match else f"\0{testid}"))
        if match:
            self.open.append([])

    def handle_endtag(self, tag):
        while self.stack:
            open_tag, testid = self.stack.pop()
            if testid is not None and testid.startswith("\0"):
                self.found.append(" ".join("".join(self.open.pop()).split()))
            if open_tag == tag:
                return

    def handle_data(self, data):
        for parts in self.open:
            parts.append(data)


def texts(html: str, testid: str, *, within: str | None = None) -> list[str]:
    """The whitespace-normalised text of every element with this data-testid (inside `within`'s element if given).

    For an <input>, its value.
    """
    parser = _Texts(testid, within)
    parser.feed(html)
    parser.close()
    return parser.found


def text(html: str, testid: str, *, within: str | None = None) -> str:
    """The text of the one element with this data-testid; fails when there is none or several."""
    found = texts(html, testid, within=within)
    assert len(found) == 1, f"{len(found)} elements with data-testid={testid!r}" + (f" in {within!r}" if within else "")
    return found[0]
