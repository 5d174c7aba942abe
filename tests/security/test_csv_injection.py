"""Finding 5: CSV formula injection.

CSV exports wrote cells beginning with `=`, `+`, `-`, `@`, tab or carriage
return as they were, and spreadsheets run such cells as formulas. As OWASP
recommends, such a cell is prefixed with a single quote in every CSV the
product writes; JSON Lines, which trainers read, keeps the text as it is.
"""

from __future__ import annotations

import csv
import io

import pytest

from app.collection.hygiene import DroppedPrompt, HygieneReport, HygieneResult, dropped_csv
from tests.test_export import add_batch, add_demonstration, add_ranking, add_task, add_user, run_export

HOSTILE = ['=HYPERLINK("http://x","y")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\tx=1", "\rx=1"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.mark.parametrize("value", HOSTILE)
def test_a_cell_that_starts_a_formula_gets_a_quote(value):
    from app.security import spreadsheet_safe

    assert spreadsheet_safe(value) == "'" + value
    assert spreadsheet_safe("plain " + value) == "plain " + value
    assert spreadsheet_safe("") == ""


def _cells(rows: list[list[str]]) -> list[str]:
    return [cell for row in rows[1:] for cell in row]


@pytest.mark.sqlite
def test_no_exported_csv_cell_starts_a_formula(db):
    labeler = add_user(db)
    batch = add_batch(db)
    task = add_task(db, batch, 4, text=HOSTILE[0])
    add_ranking(db, batch, labeler, [1, 2, 3, 4], task=task, texts=HOSTILE[1:5])
    add_demonstration(db, batch, labeler, HOSTILE[5])
    for kind in ("comparisons", "rankings", "demonstrations"):
        rows = run_export(db, kind, fmt="csv")
        assert len(rows) > 1, kind
        starts = [cell for cell in _cells(rows) if cell.startswith(FORMULA_START)]
        assert not starts, (kind, starts)
    comparisons = run_export(db, "comparisons", fmt="csv")
    header = comparisons[0]
    first = dict(zip(header, comparisons[1], strict=True))
    assert first["prompt"] == "'" + HOSTILE[0] and first["chosen"] == "'" + HOSTILE[1]
    # JSON Lines is what trainers read: the text stays exactly as written.
    assert run_export(db, "comparisons")[0]["prompt"] == HOSTILE[0]


def test_the_import_report_csv_is_neutralised_too():
    report = HygieneReport(dropped=[DroppedPrompt(line=3, rule="pii", detail="=cmd|' /C calc'!A0")])
    rows = list(csv.reader(io.StringIO(dropped_csv(HygieneResult([], report)))))
    assert rows[1] == ["3", "pii", "'=cmd|' /C calc'!A0"]
