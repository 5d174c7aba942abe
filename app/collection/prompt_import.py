"""Parsing and validation of uploaded prompt files, the first step of a prompt batch.

An admin uploads JSON Lines or CSV; this module turns the bytes into `PromptRow`s or
a complete list of `ImportIssue`s (line, field, message), with no database access.
The caller imports all-or-nothing: any issue rejects the file, so every issue is
collected rather than stopping at the first. Line numbers are 1-based physical
lines of the file (for a CSV record spanning lines, the line where it starts).
Prompt hygiene (duplicates, PII, per-user caps, splits) runs afterwards on the
rows, in `app.collection.hygiene`.

Decisions worth knowing:
- Unknown fields (JSON keys or CSV columns) are errors, not ignored: a typo such as
  `source_user` would otherwise silently lose the user id that the per-user cap and
  the split depend on.
- `text` is kept verbatim (not stripped); it only has to be non-empty after strip.
- A JSON line gives either `text` (a single-turn prompt) or `messages`, a conversation
  `[{"role", "content"}, ...]` ending with a user turn (`app.conversations` has the rule);
  its issues name the element (`messages[2].role`), and each content obeys the text limits.
  The row's `text` is then the last user message.
- `null` (JSON) or an empty cell (CSV) means "absent" for the optional fields.
- Strings PostgreSQL cannot store (NUL characters, lone surrogates from `\\ud800`
  escapes) and JSON `NaN`/`Infinity` are rejected here rather than failing at insert.
- CSV headers are matched case-insensitively; the delimiter (`,` `;` or tab) is the
  one that makes `text` a header cell.
- Blank lines (and CSV rows whose cells are all empty) are skipped; issues about the
  whole file (empty, UTF-16) are reported on line 1.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from app.conversations import Message, conversation_problems, last_user_text
from app.errors import AppError

CATEGORIES = ("plain", "few-shot", "user-based")
FIELDS = ("text", "source_user_id", "category", "metadata")
# JSON Lines may give a conversation instead of a text (the TRL / OpenAI `messages` format); CSV may not.
JSONL_FIELDS = ("text", "messages", "source_user_id", "category", "metadata")
MAX_SOURCE_USER_ID_CHARS = 200  # prompts.source_user_id is String(200)

ImportFormat = Literal["jsonl", "csv"]


@dataclass(slots=True)
class PromptRow:
    """One valid prompt read from an import file."""

    line: int
    text: str
    source_user_id: str | None = None
    category: str = "plain"
    metadata: dict[str, Any] = field(default_factory=dict)
    # The conversation when the line gave `messages`; None for a single-turn `text` prompt.
    messages: list[Message] | None = None


@dataclass(slots=True, frozen=True)
class ImportIssue:
    """One problem found in an import file; `field` is None when it concerns the whole line."""

    line: int
    field: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Returns the issue as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(slots=True)
class ParseResult:
    """The rows of a file and every issue found in it; `ok` only when there are no issues."""

    rows: list[PromptRow]
    errors: list[ImportIssue]

    @property
    def ok(self) -> bool:
        """Whether the file can be imported."""
        return not self.errors

    def error_summary(self, limit: int = 100) -> dict[str, Any]:
        """Returns the first `limit` issues and their total, as shown to the uploader."""
        return {"total": len(self.errors), "errors": [e.to_dict() for e in self.errors[:limit]]}


_BOM = codecs.BOM_UTF8
_EXTENSIONS: dict[str, ImportFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
}
_CONTENT_TYPES: dict[str, ImportFormat] = {
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/jsonlines": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/ndjson": "jsonl",
    "application/json": "jsonl",
    "text/csv": "csv",
    "text/tab-separated-values": "csv",
    "application/csv": "csv",
}


def detect_format(filename: str | None, content_type: str | None, data: bytes) -> ImportFormat:
    """Guesses "jsonl" or "csv" from the file name, then the content type, then the content.

    Raises an AppError (415, about `file`) for binary files (xlsx, zip), which are neither.
    """
    if filename:
        ext = os.path.splitext(filename.lower())[1]
        if ext in _EXTENSIONS:
            return _EXTENSIONS[ext]
    if content_type:
        base = content_type.split(";", 1)[0].strip().lower()
        if base in _CONTENT_TYPES:
            return _CONTENT_TYPES[base]
    head = data[:1024].removeprefix(_BOM)
    # Spreadsheets and archives (xlsx is a zip) are neither format; say so instead of 100 CSV errors.
    utf16 = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # parse_prompts explains that one
    if head.startswith(b"PK\x03\x04") or (b"\x00" in head and not utf16):
        raise AppError("file", "unsupported file: this looks like a binary file, not JSON Lines or CSV", 415)
    first = head.lstrip()[:1]
    return "jsonl" if first in (b"{", b"[") else "csv"


def parse_prompts(data: bytes, fmt: ImportFormat, *, max_text_chars: int = 20000) -> ParseResult:
    """Parses and validates a JSON Lines or CSV prompt file, collecting every issue."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"unknown import format {fmt!r}; expected 'jsonl' or 'csv'")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return ParseResult([], [ImportIssue(1, None, "file is UTF-16 encoded; save it as UTF-8")])
    data = data.removeprefix(_BOM)
    if fmt == "jsonl":
        return _parse_jsonl(data, max_text_chars)
    return _parse_csv(data, max_text_chars)


# -- decoding -----------------------------------------------------------------------------


def _decode_lines(data: bytes, errors: list[ImportIssue]) -> Sequence[str | None]:
    """Splits into physical lines; a line with invalid UTF-8 becomes None and gets an issue."""
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    lines: list[str | None] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad = raw[exc.start]
            errors.append(ImportIssue(number, None, f"invalid UTF-8: byte 0x{bad:02x} at column {exc.start + 1}"))
            lines.append(None)
    return lines


def _by_line(issue: ImportIssue) -> int:
    return issue.line


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def why_unstorable(value: str) -> str | None:
    """Returns why PostgreSQL could not store the string, or None if it can."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an invalid Unicode escape (a lone surrogate)"
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -- validation shared by both formats ------------------------------------------------------


def _validate(
    line: int,
    record: dict[str, Any],
    from_csv: bool,
    max_text_chars: int,
    errors: list[ImportIssue],
    escapes: bool = True,
) -> PromptRow | None:
    """Checks one record's fields; returns the row, or None after appending its issues.

    `escapes` is False when the source holds no `\\u` escape, so no string can contain
    a NUL or a lone surrogate and the costly storability checks are skipped.
    """
    start = len(errors)
    if not from_csv:
        for key in record:
            if key not in JSONL_FIELDS:
                errors.append(ImportIssue(line, key, f"unknown field {key!r} (allowed: {', '.join(JSONL_FIELDS)})"))

    text = record.get("text")
    messages: list[Message] | None = None
    if not from_csv and "messages" in record:
        if text is not None:
            errors.append(ImportIssue(line, "text", "give either text or messages, not both"))
        messages = _validate_messages(line, record["messages"], max_text_chars, errors, escapes)
        text = last_user_text(messages) if messages is not None else None
    elif text is None:
        errors.append(ImportIssue(line, "text", "text is missing"))
    elif not isinstance(text, str):
        errors.append(ImportIssue(line, "text", f"text must be a string, not {_type_name(text)}"))
    elif not text.strip():
        errors.append(ImportIssue(line, "text", "text is empty"))
    elif len(text) > max_text_chars:
        errors.append(ImportIssue(line, "text", f"text has {len(text)} characters; the maximum is {max_text_chars}"))
    elif escapes and (why := why_unstorable(text)) is not None:
        errors.append(ImportIssue(line, "text", f"text {why}"))

    user = record.get("source_user_id")
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if isinstance(user, str):
        user = user.strip() or None
        if user is not None and len(user) > MAX_SOURCE_USER_ID_CHARS:
            message = f"source_user_id is longer than {MAX_SOURCE_USER_ID_CHARS} characters"
            errors.append(ImportIssue(line, "source_user_id", message))
        elif user is not None and escapes and (why := why_unstorable(user)) is not None:
            errors.append(ImportIssue(line, "source_user_id", f"source_user_id {why}"))
    elif user is not None:
        message = f"source_user_id must be a string or an integer, not {_type_name(user)}"
        errors.append(ImportIssue(line, "source_user_id", message))

    category = record.get("category")
    if category is None or (from_csv and not category.strip()):
        category = "plain"
    elif not isinstance(category, str):
        errors.append(ImportIssue(line, "category", f"category must be a string, not {_type_name(category)}"))
    elif (category := category.strip()) not in CATEGORIES:
        errors.append(
            ImportIssue(line, "category", f"unknown category {category!r} (allowed: {', '.join(CATEGORIES)})")
        )

    metadata = record.get("metadata")
    if from_csv and isinstance(metadata, str):
        cell = metadata.strip()
        metadata = None
        escapes = "\\u" in cell
        if cell:
            try:
                metadata = json.loads(cell, parse_constant=_reject_constant)
            except ValueError as exc:
                errors.append(ImportIssue(line, "metadata", f"metadata is not valid JSON: {exc}"))
                metadata = {}
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        errors.append(ImportIssue(line, "metadata", f"metadata must be a JSON object, not {_type_name(metadata)}"))
    elif metadata and escapes:
        # json.dumps escapes a NUL as \u0000, which JSONB refuses too.
        dumped = json.dumps(metadata, ensure_ascii=False)
        why = "contains a NUL character" if "\\u0000" in dumped else why_unstorable(dumped)
        if why is not None:
            errors.append(ImportIssue(line, "metadata", f"metadata {why}"))

    if len(errors) > start:
        return None
    # No issue was added, so every check above passed: text and category are strings, user one or None.
    return PromptRow(line, cast(str, text), cast("str | None", user), cast(str, category), metadata, messages)


def _validate_messages(
    line: int, messages: Any, max_text_chars: int, errors: list[ImportIssue], escapes: bool
) -> list[Message] | None:
    """Checks a line's conversation; returns it, or None after appending its issues (each naming the element)."""
    problems = conversation_problems(messages)
    if not problems:
        for i, message in enumerate(messages):
            content = message["content"]
            if len(content) > max_text_chars:
                problems.append(
                    (f"messages[{i}].content", f"has {len(content)} characters; the maximum is {max_text_chars}")
                )
            elif escapes and (why := why_unstorable(content)) is not None:
                problems.append((f"messages[{i}].content", why))
    errors.extend(ImportIssue(line, where, message) for where, message in problems)
    if problems:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# -- JSON Lines ---------------------------------------------------------------------------


def _parse_jsonl(data: bytes, max_text_chars: int) -> ParseResult:
    errors: list[ImportIssue] = []
    rows: list[PromptRow] = []
    seen_content = False
    loads = json.JSONDecoder(parse_constant=_reject_constant).decode
    for number, line in enumerate(_decode_lines(data, errors), start=1):
        if line is None:
            seen_content = True
            continue
        if not line.strip():
            continue
        seen_content = True
        try:
            record = loads(line)
        except ValueError as exc:
            errors.append(ImportIssue(number, None, f"invalid JSON: {exc}"))
            continue
        if not isinstance(record, dict):
            errors.append(
                ImportIssue(number, None, f"line is a JSON {_type_name(record)}, not an object (one object per line)")
            )
            continue
        # Valid JSON holds no raw NUL or surrogate: they can only come from \u escapes.
        row = _validate(number, record, False, max_text_chars, errors, "\\u" in line)
        if row is not None:
            rows.append(row)
    if not seen_content:
        errors.append(ImportIssue(1, None, "file is empty"))
    errors.sort(key=_by_line)  # encoding issues are found before the others
    return ParseResult(rows, errors)


# -- CSV ----------------------------------------------------------------------------------


def _delimiter(first_line: str) -> str:
    """Picks the delimiter that makes `text` a header cell (Excel uses ';' in many locales)."""
    for candidate in (",", "\t", ";"):
        cells = [c.strip().strip('"').strip().lower() for c in first_line.split(candidate)]
        if "text" in cells:
            return candidate
    return ","


def _parse_csv(data: bytes, max_text_chars: int) -> ParseResult:
    errors: list[ImportIssue] = []
    rows: list[PromptRow] = []
    lines = _decode_lines(data, errors)
    # On decoding errors keep parsing so the other issues are reported too; the bad lines already have theirs.
    text = data.decode("utf-8", errors="replace") if errors else "\n".join(line for line in lines if line is not None)
    if not text.strip():
        return ParseResult([], errors or [ImportIssue(1, None, "file is empty")])

    # Cells may legitimately exceed the csv module's default 128 KiB limit; text length is checked below.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    first_line = next((line for line in text.split("\n") if line.strip()), "")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(first_line), strict=True)

    header: list[str] | None = None
    header_line = 0
    columns: dict[str, int] = {}
    previous_end = 0
    while True:
        start = previous_end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message:
                message = "a quoted cell starting here is never closed"
            errors.append(ImportIssue(start, None, f"malformed CSV: {message}"))
            previous_end = reader.line_num
            continue
        previous_end = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue  # blank lines and the ",,,," rows spreadsheets leave behind
        if header is None:
            header, header_line = [cell.strip().lower() for cell in cells], start
            for index, name in enumerate(header):
                if name in columns:
                    errors.append(ImportIssue(start, name, f"column {name!r} appears twice in the header"))
                elif name not in FIELDS:
                    message = f"unknown column {name!r} (allowed: {', '.join(FIELDS)})"
                    errors.append(ImportIssue(start, name or None, message))
                else:
                    columns[name] = index
            if "text" not in columns:
                errors.append(ImportIssue(start, "text", "the header has no 'text' column"))
                return ParseResult([], sorted(errors, key=_by_line))
            continue
        if len(cells) != len(header):
            errors.append(ImportIssue(start, None, f"expected {len(header)} columns, found {len(cells)}"))
            continue
        record = {name: cells[index] for name, index in columns.items()}
        row = _validate(start, record, True, max_text_chars, errors)
        if row is not None:
            rows.append(row)

    if header is None:
        errors.append(ImportIssue(1, None, "file is empty"))
    elif not rows and not errors:
        errors.append(ImportIssue(header_line, None, "the file has a header but no prompts"))
    errors.sort(key=_by_line)
    return ParseResult(rows, errors)
