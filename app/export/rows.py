"""Export rows: the columns of each export and the code that turns database rows into JSON Lines or CSV text.

`app.export.stream` reads one snapshot and hands each unit (a ranking with its
items, a demonstration, a task's rankings for the consensus) to `RENDER`,
which builds the text of its rows. These builders work on plain tuples and
pre-encoded JSON fragments rather than dicts and `json.dumps`, because this
path must sustain 100,000+ comparison rows per second; the positions of each
field in a row are the constants below (see the queries in `app.export.stream`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, select

from app.models import ModelVersion
from app.quality.agreement import borda_consensus
from app.security import csv_row, spreadsheet_safe

_mv = ModelVersion.__table__

DEMONSTRATION_COLUMNS = (
    "prompt",
    "completion",
    "demonstration_id",
    "prompt_id",
    "task_id",
    "batch",
    "batch_id",
    "split",
    "labeler",
    "labeler_held_out",
    "active_seconds",
    "submitted_at",
    "cursor",
)
COMPARISON_COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "ranking_id",
    "prompt_id",
    "task_id",
    "chosen_rank",
    "chosen_likert",
    "chosen_completion_id",
    "chosen_model_version",
    "rejected_rank",
    "rejected_likert",
    "rejected_completion_id",
    "rejected_model_version",
    "weight",
    "batch",
    "batch_id",
    "split",
    "labeler",
    "labeler_held_out",
    "all_unacceptable",
    "submitted_at",
    "cursor",
)
RANKING_COLUMNS = (
    "ranking_id",
    "prompt_id",
    "task_id",
    "prompt",
    "k",
    "completions",
    "all_unacceptable",
    "is_gold",
    "active_seconds",
    "batch",
    "batch_id",
    "split",
    "labeler",
    "labeler_held_out",
    "submitted_at",
    "cursor",
)
# rankings?aggregate=consensus: one row per task with at least one ranking (after the filters), in task order.
# `labelers` lists the pseudonyms of the labelers whose rankings were combined; each of `completions` (in
# completion id order) has completion_id, text, model_version, consensus_rank (Borda count over those rankings
# as dense ranks: 1 = best, equal scores tie) and ranks (one per labeler, in the order of `labelers`).
# `cursor` is the task id.
CONSENSUS_COLUMNS = (
    "task_id",
    "prompt_id",
    "prompt",
    "k",
    "n_rankings",
    "labelers",
    "completions",
    "batch",
    "batch_id",
    "split",
    "cursor",
)
AGGREGATES = ("none", "consensus")
COLUMNS = {
    "demonstrations": DEMONSTRATION_COLUMNS,
    "comparisons": COMPARISON_COLUMNS,
    "rankings": RANKING_COLUMNS,
    "consensus": CONSENSUS_COLUMNS,
}


_json_str = json.JSONEncoder(ensure_ascii=False).encode  # for a str this is the C string encoder
_json_any = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def labeler_pseudonym(secret_key: str, user_id: int) -> str:
    """Returns a labeler's export id: stable per deployment, revealing neither user id nor name."""
    digest = hmac.new(secret_key.encode(), b"instructloop-labeler:%d" % user_id, hashlib.sha256).hexdigest()
    return "lab_" + digest[:16]


@lru_cache(maxsize=4096)
def comparison_pairs(ranks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Returns the (chosen, rejected) index pairs of outputs sorted best first; tied outputs give none."""
    return tuple((i, j) for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] < ranks[j])


def iso_utc(value: datetime) -> str:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


# --- row builders ---------------------------------------------------------------------------------

# Positions in a ranking row and in an item row (see the queries above).
(
    R_ID,
    R_PROMPT_ID,
    R_TASK_ID,
    R_LABELER,
    R_UNACCEPTABLE,
    R_GOLD,
    R_SECONDS,
    R_AT,
    P_TEXT,
    P_SPLIT,
    P_BATCH_ID,
    B_NAME,
    U_HELD_OUT,
) = range(13)
I_RANKING, I_COMPLETION, I_RANK, I_LIKERT, I_POSITION, I_TEXT, I_VERSION, I_FLAGS = range(8)
_best_first = itemgetter(I_RANK, I_POSITION, I_COMPLETION)
_by_position = itemgetter(I_POSITION, I_COMPLETION)
_JSON_BOOL = {True: "true", False: "false"}


class Names:
    """What rows refer to by id, read once per export: labeler pseudonyms and model version names."""

    def __init__(self, conn: Connection, secret_key: str):
        self.secret_key = secret_key
        self.pseudonyms: dict[int, str] = {}
        # Model versions are few; a dict lookup per item beats joining their names onto every item row.
        self.versions: dict[int | None, str | None] = dict(conn.execute(select(_mv.c.id, _mv.c.name)).all())
        self.versions[None] = None
        self.versions_json = {key: "null" if name is None else _json_str(name) for key, name in self.versions.items()}
        self.versions_csv = {key: _csv_field(name) for key, name in self.versions.items()}

    def labeler(self, user_id: int) -> str:
        """Returns the pseudonym of a labeler, computing each one once."""
        name = self.pseudonyms.get(user_id)
        if name is None:
            name = self.pseudonyms[user_id] = labeler_pseudonym(self.secret_key, user_id)
        return name


def _comparison_jsonl(unit: tuple[Sequence, list], skip_through: int, names: Names) -> str:
    ranking, items = unit
    items.sort(key=_best_first)
    pairs = comparison_pairs(tuple(row[I_RANK] for row in items))
    if len(pairs) <= skip_through + 1:
        return ""
    rid = ranking[R_ID]
    # Every row is four per-output fragments and the pair index, so a row costs one small f-string.
    prompt = _json_str(ranking[P_TEXT])
    ids = f'"ranking_id":{rid},"prompt_id":{ranking[R_PROMPT_ID]},"task_id":{ranking[R_TASK_ID]}'
    common = (
        f'"weight":{1 / len(pairs)!r},"batch":{_json_str(ranking[B_NAME])},"batch_id":{ranking[P_BATCH_ID]},'
        f'"split":{_json_str(ranking[P_SPLIT])},"labeler":"{names.labeler(ranking[R_LABELER])}",'
        f'"labeler_held_out":{_JSON_BOOL[bool(ranking[U_HELD_OUT])]},'
        f'"all_unacceptable":{_JSON_BOOL[bool(ranking[R_UNACCEPTABLE])]},"submitted_at":"{iso_utc(ranking[R_AT])}",'
        f'"cursor":"{rid}:'
    )
    chosen_text, rejected_text, chosen, rejected = [], [], [], []
    versions = names.versions_json
    for row in items:
        text = _json_str(row[I_TEXT])
        rank, likert, completion, version = row[I_RANK], row[I_LIKERT], row[I_COMPLETION], versions[row[I_VERSION]]
        chosen_text.append(f'{{"prompt":{prompt},"chosen":{text},"rejected":')
        rejected_text.append(f"{text},{ids},")
        chosen.append(
            f'"chosen_rank":{rank},"chosen_likert":{likert},"chosen_completion_id":{completion},'
            f'"chosen_model_version":{version},'
        )
        rejected.append(
            f'"rejected_rank":{rank},"rejected_likert":{likert},"rejected_completion_id":{completion},'
            f'"rejected_model_version":{version},{common}'
        )
    return "".join(
        [
            f'{chosen_text[i]}{rejected_text[j]}{chosen[i]}{rejected[j]}{n}"}}\n'
            for n, (i, j) in enumerate(pairs)
            if n > skip_through
        ]
    )


def _csv_field(value: str | None) -> str:
    """Quotes a text field the way csv.writer's QUOTE_MINIMAL does, after neutralising a formula (see csv_line)."""
    if value is None:
        return ""
    value = spreadsheet_safe(value)
    if _CSV_SPECIAL.search(value):
        return '"' + value.replace('"', '""') + '"'
    return value


_CSV_SPECIAL = re.compile(r'[",\r\n]')


def csv_line(values: Iterable[Any]) -> str:
    """One CSV row; a text cell a spreadsheet would run as a formula gets a leading quote (JSON Lines keeps it)."""
    return csv_row(values)


def _comparison_csv(unit: tuple[Sequence, list], skip_through: int, names: Names) -> str:
    # The same pre-encoded-fragment approach as JSON Lines: csv.writer would re-examine every field of every pair.
    ranking, items = unit
    items.sort(key=_best_first)
    pairs = comparison_pairs(tuple(row[I_RANK] for row in items))
    if len(pairs) <= skip_through + 1:
        return ""
    rid = ranking[R_ID]
    head = _csv_field(ranking[P_TEXT])
    ids = f"{rid},{ranking[R_PROMPT_ID]},{ranking[R_TASK_ID]}"
    common = (
        f"{1 / len(pairs)!r},{_csv_field(ranking[B_NAME])},{ranking[P_BATCH_ID]},{_csv_field(ranking[P_SPLIT])},"
        f"{names.labeler(ranking[R_LABELER])},{bool(ranking[U_HELD_OUT])},{bool(ranking[R_UNACCEPTABLE])},"
        f"{iso_utc(ranking[R_AT])},{rid}:"
    )
    chosen = [f"{head},{_csv_field(row[I_TEXT])}," for row in items]
    rejected = [f"{_csv_field(row[I_TEXT])},{ids}," for row in items]
    chosen_sides = [
        f"{row[I_RANK]},{row[I_LIKERT]},{row[I_COMPLETION]},{names.versions_csv[row[I_VERSION]]}," for row in items
    ]
    rejected_sides = [f"{side}{common}" for side in chosen_sides]
    return "".join(
        [
            f"{chosen[i]}{rejected[j]}{chosen_sides[i]}{rejected_sides[j]}{n}\n"
            for n, (i, j) in enumerate(pairs)
            if n > skip_through
        ]
    )


def _ranking_record(ranking: Sequence, items: list, names: Names) -> dict[str, Any]:
    items.sort(key=_by_position)  # the order the labeler saw them in
    return {
        "ranking_id": ranking[R_ID],
        "prompt_id": ranking[R_PROMPT_ID],
        "task_id": ranking[R_TASK_ID],
        "prompt": ranking[P_TEXT],
        "k": len(items),
        "completions": [
            {
                "completion_id": row[I_COMPLETION],
                "text": row[I_TEXT],
                "rank": row[I_RANK],
                "likert": row[I_LIKERT],
                "flags": list(row[I_FLAGS] or []),
                "position": row[I_POSITION],
                "model_version": names.versions[row[I_VERSION]],
            }
            for row in items
        ],
        "all_unacceptable": bool(ranking[R_UNACCEPTABLE]),
        "is_gold": bool(ranking[R_GOLD]),
        "active_seconds": ranking[R_SECONDS],
        "batch": ranking[B_NAME],
        "batch_id": ranking[P_BATCH_ID],
        "split": ranking[P_SPLIT],
        "labeler": names.labeler(ranking[R_LABELER]),
        "labeler_held_out": bool(ranking[U_HELD_OUT]),
        "submitted_at": iso_utc(ranking[R_AT]),
        "cursor": str(ranking[R_ID]),
    }


def _demonstration_record(row: Sequence, names: Names) -> tuple:
    demo_id, prompt_id, task_id, labeler_id, seconds, at, text, prompt, split, batch_id, batch, held_out = row
    return (
        prompt,
        text,
        demo_id,
        prompt_id,
        task_id,
        batch,
        batch_id,
        split,
        names.labeler(labeler_id),
        bool(held_out),
        seconds,
        iso_utc(at),
        str(demo_id),
    )


def _ranking_jsonl(unit: tuple[Sequence, list], skip_through: int, names: Names) -> str:
    return _json_any(_ranking_record(*unit, names)) + "\n"


def _ranking_csv(unit: tuple[Sequence, list], skip_through: int, names: Names) -> str:
    record = _ranking_record(*unit, names)
    record["completions"] = _json_any(record["completions"])
    return csv_line(record.values())


def _demonstration_jsonl(row: Sequence, skip_through: int, names: Names) -> str:
    return _json_any(dict(zip(DEMONSTRATION_COLUMNS, _demonstration_record(row, names), strict=True))) + "\n"


def _demonstration_csv(row: Sequence, skip_through: int, names: Names) -> str:
    return csv_line(_demonstration_record(row, names))


def _consensus_record(task_id: int, rankings: list, names: Names) -> dict[str, Any]:
    outputs = dict(sorted((row[I_COMPLETION], row) for _ranking, items in rankings for row in items))
    index = {completion: i for i, completion in enumerate(outputs)}
    # Every ranking of a task covers its K outputs; one that does not cannot enter a consensus.
    complete = [(ranking, items) for ranking, items in rankings if len(items) == len(outputs)]
    given = []
    for _ranking, items in complete:
        ranks = [0] * len(outputs)
        for row in items:
            ranks[index[row[I_COMPLETION]]] = row[I_RANK]
        given.append(ranks)
    consensus = borda_consensus(given)
    first = complete[0][0]
    return {
        "task_id": task_id,
        "prompt_id": first[R_PROMPT_ID],
        "prompt": first[P_TEXT],
        "k": len(outputs),
        "n_rankings": len(complete),
        "labelers": [names.labeler(ranking[R_LABELER]) for ranking, _items in complete],
        "completions": [
            {
                "completion_id": completion,
                "text": row[I_TEXT],
                "model_version": names.versions[row[I_VERSION]],
                "consensus_rank": consensus[i],
                "ranks": [ranks[i] for ranks in given],
            }
            for i, (completion, row) in enumerate(outputs.items())
        ],
        "batch": first[B_NAME],
        "batch_id": first[P_BATCH_ID],
        "split": first[P_SPLIT],
        "cursor": str(task_id),
    }


def _consensus_jsonl(unit: tuple[int, list], skip_through: int, names: Names) -> str:
    return _json_any(_consensus_record(*unit, names)) + "\n"


def _consensus_csv(unit: tuple[int, list], skip_through: int, names: Names) -> str:
    record = _consensus_record(*unit, names)
    record["labelers"], record["completions"] = _json_any(record["labelers"]), _json_any(record["completions"])
    return csv_line(record.values())


# (kind, format) -> renders one unit as text, leaving out its pairs up to `skip_through` (comparisons only).
RENDER: dict[tuple[str, str], Callable[[Any, int, Names], str]] = {
    ("comparisons", "jsonl"): _comparison_jsonl,
    ("comparisons", "csv"): _comparison_csv,
    ("rankings", "jsonl"): _ranking_jsonl,
    ("rankings", "csv"): _ranking_csv,
    ("demonstrations", "jsonl"): _demonstration_jsonl,
    ("demonstrations", "csv"): _demonstration_csv,
    ("consensus", "jsonl"): _consensus_jsonl,
    ("consensus", "csv"): _consensus_csv,
}
