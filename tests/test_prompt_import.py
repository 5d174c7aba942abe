"""Tests for parsing and validating prompt import files (JSON Lines and CSV), no database."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.collection.prompt_import import (
    ImportIssue,
    PromptRow,
    detect_format,
    parse_prompts,
)


def issues(data: bytes, fmt: str, **kwargs) -> list[tuple[int, str | None]]:
    """Returns (line, field) of every issue, in order."""
    result = parse_prompts(data, fmt, **kwargs)
    return [(e.line, e.field) for e in result.errors]


def jsonl(*objects) -> bytes:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects).encode()


# -- JSON Lines: valid input ------------------------------------------------------------------


def test_jsonl_reads_every_field_and_defaults():
    data = jsonl(
        {"text": "Write a poem.", "source_user_id": "u1", "category": "few-shot", "metadata": {"lang": "en"}},
        {"text": "  Explain tides.\n", "source_user_id": 42},
        {"text": "Hi", "source_user_id": None, "category": None, "metadata": None},
    )
    result = parse_prompts(data, "jsonl")
    assert result.ok
    assert result.rows == [
        PromptRow(1, "Write a poem.", "u1", "few-shot", {"lang": "en"}),
        PromptRow(2, "  Explain tides.\n", "42", "plain", {}),
        PromptRow(3, "Hi", None, "plain", {}),
    ]


def test_jsonl_skips_blank_lines_but_keeps_physical_line_numbers_with_bom_and_crlf():
    data = b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \r\n{"text": "b"}\r\n\n{"text": "c"}'
    result = parse_prompts(data, "jsonl")
    assert result.ok
    assert [(r.line, r.text) for r in result.rows] == [(1, "a"), (4, "b"), (6, "c")]


# -- JSON Lines: every error with its line and field ------------------------------------------


def test_jsonl_bad_json_and_non_objects():
    data = jsonl({"text": "ok"}, "{not json", "[1, 2]", '"just a string"', "17", {"text": "ok"})
    result = parse_prompts(data, "jsonl")
    assert [(e.line, e.field) for e in result.errors] == [(2, None), (3, None), (4, None), (5, None)]
    assert result.errors[0].message.startswith("invalid JSON")
    assert "array, not an object" in result.errors[1].message
    assert "string, not an object" in result.errors[2].message
    assert [r.line for r in result.rows] == [1, 6]


def test_jsonl_text_errors():
    data = jsonl(
        {"category": "plain"}, {"text": ""}, {"text": " \n\t "}, {"text": 5}, {"text": "x" * 11}, {"text": "x" * 10}
    )
    result = parse_prompts(data, "jsonl", max_text_chars=10)
    assert [(e.line, e.field) for e in result.errors] == [(n, "text") for n in range(1, 6)]
    messages = [e.message for e in result.errors]
    assert messages[0] == "text is missing"
    assert messages[1] == messages[2] == "text is empty"
    assert messages[3] == "text must be a string, not number"
    assert messages[4] == "text has 11 characters; the maximum is 10"
    assert [r.line for r in result.rows] == [6]


def test_jsonl_unknown_category_wrong_types_and_unknown_fields():
    data = jsonl(
        {"text": "a", "category": "fewshot"},
        {"text": "a", "category": 3},
        {"text": "a", "source_user_id": 1.5},
        {"text": "a", "source_user_id": True},
        {"text": "a", "metadata": [1]},
        {"text": "a", "metadata": "x"},
        {"text": "a", "prompt": "b", "id": 1},
    )
    assert issues(data, "jsonl") == [
        (1, "category"),
        (2, "category"),
        (3, "source_user_id"),
        (4, "source_user_id"),
        (5, "metadata"),
        (6, "metadata"),
        (7, "prompt"),
        (7, "id"),
    ]
    first = parse_prompts(data, "jsonl").errors[0]
    assert first.message == "unknown category 'fewshot' (allowed: plain, few-shot, user-based)"


def test_jsonl_reports_several_errors_of_one_line():
    assert issues(jsonl({"text": "", "category": "other", "metadata": 1}), "jsonl") == [
        (1, "text"),
        (1, "category"),
        (1, "metadata"),
    ]


def test_jsonl_invalid_utf8_reports_the_line_and_parses_the_others():
    data = b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "b"}\n{"text": "\xff\xfe"}\n'
    result = parse_prompts(data, "jsonl")
    assert [(e.line, e.field) for e in result.errors] == [(2, None), (4, None)]
    assert result.errors[0].message == "invalid UTF-8: byte 0xe9 at column 14"
    assert [r.line for r in result.rows] == [1, 3]


def test_jsonl_rejects_what_postgres_cannot_store():
    data = jsonl(
        '{"text": "a\\u0000b"}',
        '{"text": "\\ud800"}',
        '{"text": "a", "metadata": {"k": "\\u0000"}}',
        '{"text": "a", "metadata": {"k": NaN}}',
        '{"text": "a", "source_user_id": "u\\u0000"}',
        '{"text": "caf\\u00e9", "metadata": {"k": "\\u00e9"}}',
    )
    result = parse_prompts(data, "jsonl")
    assert [(e.line, e.field) for e in result.errors] == [
        (1, "text"),
        (2, "text"),
        (3, "metadata"),
        (4, None),
        (5, "source_user_id"),
    ]
    assert result.rows == [PromptRow(6, "café", None, "plain", {"k": "é"})]


def test_source_user_id_longer_than_the_column_is_an_error():
    data = jsonl({"text": "a", "source_user_id": "u" * 201}, {"text": "a", "source_user_id": "u" * 200})
    assert issues(data, "jsonl") == [(1, "source_user_id")]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_empty_file(data, fmt):
    result = parse_prompts(data, fmt)
    assert result.errors == [ImportIssue(1, None, "file is empty")]
    assert result.rows == []


def test_utf16_file_is_refused_with_a_hint():
    result = parse_prompts('{"text": "a"}\n'.encode("utf-16"), "jsonl")
    assert result.errors == [ImportIssue(1, None, "file is UTF-16 encoded; save it as UTF-8")]


def test_ten_thousand_lines_with_one_bad_line_gives_exactly_that_error():
    lines = [json.dumps({"text": f"prompt number {i}", "source_user_id": f"u{i % 37}"}) for i in range(10_000)]
    lines[6_789] = json.dumps({"text": "prompt number 6789", "category": "unknown"})
    result = parse_prompts(("\n".join(lines) + "\n").encode(), "jsonl")
    assert [(e.line, e.field) for e in result.errors] == [(6_790, "category")]
    assert len(result.rows) == 9_999


def test_error_summary_keeps_the_first_hundred_and_the_total():
    data = jsonl(*([{"text": ""}] * 250))
    summary = parse_prompts(data, "jsonl").error_summary()
    assert summary["total"] == 250
    assert len(summary["errors"]) == 100
    assert summary["errors"][0] == {"line": 1, "field": "text", "message": "text is empty"}
    json.dumps(summary)


# -- CSV --------------------------------------------------------------------------------------


def test_csv_reads_fields_and_uses_the_start_line_of_multiline_records():
    data = (
        b"\xef\xbb\xbftext,source_user_id,category,metadata\r\n"
        b'"Translate:\r\nhello\r\nworld",u1,few-shot,"{""lang"": ""fr""}"\r\n'
        b"\r\n"
        b"Summarise this,,,\r\n"
        b",,,\r\n"
        b'"Say ""hi""", 7 ,user-based,\r\n'
    )
    result = parse_prompts(data, "csv")
    assert result.ok, result.errors
    assert result.rows == [
        PromptRow(2, "Translate:\r\nhello\r\nworld", "u1", "few-shot", {"lang": "fr"}),
        PromptRow(6, "Summarise this", None, "plain", {}),
        PromptRow(8, 'Say "hi"', "7", "user-based", {}),
    ]


def test_csv_header_is_case_insensitive_and_columns_may_be_missing_or_reordered():
    result = parse_prompts(b"Category, TEXT\nfew-shot,hello\n", "csv")
    assert result.rows == [PromptRow(2, "hello", None, "few-shot", {})]


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_semicolon_and_tab_delimiters(delimiter):
    data = f"text{delimiter}source_user_id\nhello, world{delimiter}u9\n".encode()
    assert parse_prompts(data, "csv").rows == [PromptRow(2, "hello, world", "u9", "plain", {})]


def test_csv_column_count_errors():
    data = b"text,category\na,plain\nb\nc,plain,extra\nd,plain\n"
    result = parse_prompts(data, "csv")
    assert [(e.line, e.field, e.message) for e in result.errors] == [
        (3, None, "expected 2 columns, found 1"),
        (4, None, "expected 2 columns, found 3"),
    ]
    assert [r.line for r in result.rows] == [2, 5]


def test_csv_header_without_text_column():
    result = parse_prompts(b"prompt,category\na,plain\n", "csv")
    assert [(e.line, e.field) for e in result.errors] == [(1, "prompt"), (1, "text")]
    assert result.errors[-1].message == "the header has no 'text' column"


def test_csv_header_after_blank_lines_and_duplicate_or_unknown_columns():
    data = b"\n\ntext,text,notes\na,b,c\n"
    assert issues(data, "csv") == [(3, "text"), (3, "notes")]


def test_csv_header_only():
    result = parse_prompts(b"text,category\n", "csv")
    assert result.errors == [ImportIssue(1, None, "the file has a header but no prompts")]


def test_csv_value_errors_with_fields():
    data = (
        b"text,source_user_id,category,metadata\n"
        b",u1,plain,\n"
        b"a,u1,bogus,\n"
        b"a,u1,plain,{bad json}\n"
        b'a,u1,plain,"[1,2]"\n'
        b"a\x00b,u1,plain,\n"
        b'a,u1,plain,"{""k"": ""\\u0000""}"\n'
        b"0123456789A,u1,plain,\n"
    )
    assert issues(data, "csv", max_text_chars=10) == [
        (2, "text"),
        (3, "category"),
        (4, "metadata"),
        (5, "metadata"),
        (6, "text"),
        (7, "metadata"),
        (8, "text"),
    ]


def test_csv_invalid_utf8_line_and_other_errors_are_all_reported():
    data = b"text,category\nok,plain\nbad \xc3\x28 bytes,plain\nx,nope\n"
    result = parse_prompts(data, "csv")
    assert [(e.line, e.field) for e in result.errors] == [(3, None), (4, "category")]
    assert result.errors[0].message == "invalid UTF-8: byte 0xc3 at column 5"


def test_csv_malformed_quotes():
    data = b'text,category\n"a"b,plain\nfine,plain\n"never closed,plain\nmore\n'
    result = parse_prompts(data, "csv")
    assert [(e.line, e.field) for e in result.errors] == [(2, None), (4, None)]
    assert result.errors[1].message == "malformed CSV: a quoted cell starting here is never closed"
    assert [r.line for r in result.rows] == [3]


def test_csv_cells_larger_than_the_csv_module_default_limit():
    big = "x" * 200_000
    result = parse_prompts(f'text\n"{big}"\nsmall\n'.encode(), "csv", max_text_chars=300_000)
    assert [len(r.text) for r in result.rows] == [200_000, 5]


def test_csv_ten_thousand_rows_with_one_bad_row():
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "source_user_id"])
    for i in range(10_000):
        writer.writerow([f"prompt {i}", f"u{i}"] if i != 4_321 else [f"prompt {i}"])
    result = parse_prompts(out.getvalue().encode(), "csv")
    assert [(e.line, e.field) for e in result.errors] == [(4_323, None)]
    assert len(result.rows) == 9_999


# -- round trip -------------------------------------------------------------------------------

storable = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
prompt_text = st.text(storable, min_size=1, max_size=40).filter(lambda t: t.strip())
user_ids = st.one_of(st.none(), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True))
records = st.lists(
    st.tuples(prompt_text, user_ids, st.sampled_from(["plain", "few-shot", "user-based"])),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(records)
def test_any_valid_prompts_round_trip_through_jsonl_and_csv(items):
    expected = [(text, user, category) for text, user, category in items]
    lines = [json.dumps({"text": t, "source_user_id": u, "category": c}) for t, u, c in items]
    as_jsonl = parse_prompts("\n".join(lines).encode(), "jsonl")
    assert as_jsonl.ok
    assert [(r.text, r.source_user_id, r.category) for r in as_jsonl.rows] == expected
    assert [r.line for r in as_jsonl.rows] == list(range(1, len(items) + 1))

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "source_user_id", "category"])
    writer.writerows([t, u or "", c] for t, u, c in items)
    as_csv = parse_prompts(out.getvalue().encode(), "csv")
    assert as_csv.ok, as_csv.errors
    assert [(r.text, r.source_user_id, r.category) for r in as_csv.rows] == expected


# -- format detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content_type", "data", "expected"),
    [
        ("prompts.jsonl", None, b"text\nhello", "jsonl"),
        ("PROMPTS.NDJSON", None, b"", "jsonl"),
        ("prompts.csv", "application/json", b'{"text": "a"}', "csv"),
        ("prompts.tsv", None, b"text\thello", "csv"),
        (None, "text/csv; charset=utf-8", b'{"text": "a"}', "csv"),
        ("upload", "application/x-ndjson", b"text", "jsonl"),
        (None, None, b'\xef\xbb\xbf\n  {"text": "a"}', "jsonl"),
        ("upload.txt", "text/plain", b"text,category\na,plain", "csv"),
    ],
)
def test_detect_format(filename, content_type, data, expected):
    assert detect_format(filename, content_type, data) == expected


def test_detect_format_refuses_binary_files():
    with pytest.raises(ValueError, match="binary"):
        detect_format("prompts.xlsx", None, b"PK\x03\x04\x14\x00\x06\x00")


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown import format 'xml'; expected 'jsonl' or 'csv'"):
        parse_prompts(b"text\na\n", "xml")  # type: ignore[arg-type]
