"""Export: pair expansion, filters, cursors, snapshots, formats and access of the export API.

Ranking data is inserted row by row (prompt, task, completions, assignment,
ranking, items) so these tests do not depend on the labeling service.
Service-level tests run on the test's rolled-back connection (PostgreSQL and
SQLite); HTTP tests run against the real uvicorn `live_server` on committed
data, because each export reads from a snapshot connection of its own.
"""

from __future__ import annotations

import concurrent.futures
import csv
import gzip
import io
import itertools
import json
import random
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select

from app.config import get_settings
from app.db import get_engine
from app.export import stream as export_service
from app.export.rows import (
    COMPARISON_COLUMNS,
    DEMONSTRATION_COLUMNS,
    RANKING_COLUMNS,
    comparison_pairs,
    labeler_pseudonym,
)
from app.export.stream import SnapshotExport, export_chunks, parse_cursor, resolve_filters
from app.models import (
    Assignment,
    Completion,
    Demonstration,
    ModelVersion,
    Prompt,
    PromptBatch,
    Ranking,
    RankingItem,
    Task,
    User,
)
from app.security import create_api_token

pytestmark = pytest.mark.sqlite

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
_seq = itertools.count(1)


# --- data ---------------------------------------------------------------------------------------


def add_user(db, role="labeler", held_out=False) -> User:
    n = next(_seq)
    user = User(username=f"exp-{role}-{n}", role=role, password_hash="x", held_out=held_out)
    db.add(user)
    db.flush()
    return user


def add_batch(db, name=None) -> PromptBatch:
    batch = PromptBatch(name=name or f"exp-batch-{next(_seq)}", k=4)
    db.add(batch)
    db.flush()
    return batch


def add_version(db, name) -> ModelVersion:
    version = ModelVersion(name=name, kind="policy", status="ready")
    db.add(version)
    db.flush()
    return version


def add_task(db, batch, k, split="train", text=None) -> Task:
    n = next(_seq)
    prompt = Prompt(
        batch_id=batch.id, text=text or f"Sort the numbers {n} 3 1", split=split, normalized_key=f"{n:064x}"
    )
    db.add(prompt)
    db.flush()
    task = Task(batch_id=batch.id, prompt_id=prompt.id, kind="ranking", k=k, needed=3)
    db.add(task)
    db.flush()
    return task


def add_ranking(
    db,
    batch,
    labeler,
    ranks,
    *,
    task=None,
    split="train",
    likerts=None,
    versions=None,
    positions=None,
    texts=None,
    all_unacceptable=False,
    created_at=None,
    flags=None,
) -> Ranking:
    """Inserts a submitted ranking: item i has ranks[i], shown at positions[i] (default i)."""
    k = len(ranks)
    task = task or add_task(db, batch, k, split)
    completions = [
        Completion(
            prompt_id=task.prompt_id,
            text=(texts[i] if texts else f"t{task.id}-out{i}"),
            model_version_id=(versions[i].id if versions and versions[i] else None),
        )
        for i in range(k)
    ]
    db.add_all(completions)
    assignment = Assignment(
        task_id=task.id, labeler_id=labeler.id, state="submitted", expires_at=T0 + timedelta(days=1)
    )
    db.add(assignment)
    db.flush()
    ranking = Ranking(
        assignment_id=assignment.id,
        task_id=task.id,
        prompt_id=task.prompt_id,
        labeler_id=labeler.id,
        all_unacceptable=all_unacceptable,
        created_at=created_at or T0,
    )
    db.add(ranking)
    db.flush()
    db.add_all(
        [
            RankingItem(
                ranking_id=ranking.id,
                completion_id=c.id,
                rank=ranks[i],
                likert=(likerts or [4] * k)[i],
                flags=(flags or {}).get(i, []),
                position=(positions or list(range(k)))[i],
            )
            for i, c in enumerate(completions)
        ]
    )
    db.flush()
    return ranking


def add_demonstration(db, batch, labeler, text, *, split="train", created_at=None, task=None) -> Demonstration:
    if task is None:
        n = next(_seq)
        prompt = Prompt(batch_id=batch.id, text=f"Reverse the word w{n}", split=split, normalized_key=f"d{n:063x}")
        db.add(prompt)
        db.flush()
        task = Task(batch_id=batch.id, prompt_id=prompt.id, kind="demonstration", needed=3)
        db.add(task)
        db.flush()
    assignment = Assignment(
        task_id=task.id, labeler_id=labeler.id, state="submitted", expires_at=T0 + timedelta(days=1)
    )
    db.add(assignment)
    db.flush()
    demo = Demonstration(
        assignment_id=assignment.id,
        task_id=task.id,
        prompt_id=task.prompt_id,
        labeler_id=labeler.id,
        text=text,
        created_at=created_at or T0,
    )
    db.add(demo)
    db.flush()
    return demo


def run_export(db, kind, fmt="jsonl", cursor=None, **filters) -> list:
    """Exports through the service on the test's own connection; returns parsed rows."""
    conn = db.connection()
    secret = get_settings().secret_key
    body = b"".join(
        export_chunks(
            conn,
            kind,
            resolve_filters(conn, kind, secret, **filters),
            secret_key=secret,
            fmt=fmt,
            cursor=parse_cursor(kind, cursor) if cursor else None,
        )
    )
    if fmt == "csv":
        return list(csv.reader(io.StringIO(body.decode())))
    return [json.loads(line) for line in body.decode().splitlines()]


def brute_force_pairs(ranks):
    return {(a, b) for a in range(len(ranks)) for b in range(len(ranks)) if ranks[a] < ranks[b]}


# --- pair expansion -----------------------------------------------------------------------------


def test_pairs_of_k4_without_ties_in_exact_order(db):
    batch, labeler = add_batch(db), add_user(db)
    # Shown in display order out0..out3 with ranks 2, 1, 4, 3: best first is out1, out0, out3, out2.
    ranking = add_ranking(db, batch, labeler, [2, 1, 4, 3], likerts=[5, 7, 1, 3], texts=["a", "b", "c", "d"])
    rows = run_export(db, "comparisons")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("b", "a"),
        ("b", "d"),
        ("b", "c"),
        ("a", "d"),
        ("a", "c"),
        ("d", "c"),
    ]
    assert [(r["chosen_rank"], r["rejected_rank"]) for r in rows] == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert [(r["chosen_likert"], r["rejected_likert"]) for r in rows] == [
        (7, 5),
        (7, 3),
        (7, 1),
        (5, 3),
        (5, 1),
        (3, 1),
    ]
    assert [r["cursor"] for r in rows] == [f"{ranking.id}:{n}" for n in range(6)]
    assert all(r["weight"] == 1 / 6 for r in rows)
    assert all(r["ranking_id"] == ranking.id and r["prompt_id"] == ranking.prompt_id for r in rows)
    assert list(rows[0]) == list(COMPARISON_COLUMNS)


def test_tied_outputs_yield_no_pair_but_stay_in_the_ranking_export(db):
    batch, labeler = add_batch(db), add_user(db)
    tied = add_ranking(db, batch, labeler, [1, 2, 2, 3], texts=["a", "b", "c", "d"])
    all_tied = add_ranking(db, batch, labeler, [1, 1, 1, 1])
    rows = run_export(db, "comparisons")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert all(r["weight"] == 1 / 5 and r["ranking_id"] == tied.id for r in rows)
    rankings = run_export(db, "rankings")
    assert [r["ranking_id"] for r in rankings] == [tied.id, all_tied.id]
    assert [c["rank"] for c in rankings[1]["completions"]] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "ranks",
    [
        list(range(1, 10)),
        [1, 1, 2, 2, 2, 3, 4, 4, 5],
        [9, 1, 5, 5, 2, 8, 8, 3, 1],
    ],
)
def test_pairs_of_k9_match_a_brute_force_count(db, ranks):
    batch, labeler = add_batch(db), add_user(db)
    ranking = add_ranking(db, batch, labeler, ranks, texts=[f"o{i}" for i in range(9)])
    rows = run_export(db, "comparisons")
    expected = brute_force_pairs(ranks)
    assert {(int(r["chosen"][1:]), int(r["rejected"][1:])) for r in rows} == expected
    assert (
        len(rows)
        == len(expected)
        == {(1, 2, 3, 4, 5, 6, 7, 8, 9): 36, (1, 1, 2, 2, 2, 3, 4, 4, 5): 31, (9, 1, 5, 5, 2, 8, 8, 3, 1): 33}[
            tuple(ranks)
        ]
    )
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
    assert all(r["chosen_rank"] < r["rejected_rank"] for r in rows)
    assert [r["cursor"] for r in rows] == [f"{ranking.id}:{n}" for n in range(len(expected))]


def test_comparison_pairs_are_best_first_and_skip_ties():
    assert comparison_pairs((1, 2, 3)) == ((0, 1), (0, 2), (1, 2))
    assert comparison_pairs((1, 1, 2)) == ((0, 2), (1, 2))
    assert comparison_pairs((3, 3, 3, 3)) == ()


def test_ranking_rows_carry_display_order_flags_and_provenance(db):
    batch, labeler = add_batch(db, "prov-batch"), add_user(db, held_out=True)
    policy, base = add_version(db, "policy-7"), add_version(db, "base-1")
    ranking = add_ranking(
        db,
        batch,
        labeler,
        [3, 1, 2, 4],
        split="valid",
        likerts=[2, 6, 5, 1],
        versions=[policy, base, None, policy],
        positions=[2, 0, 3, 1],
        texts=list("wxyz"),
        flags={3: ["hallucination"]},
        all_unacceptable=False,
    )
    (row,) = run_export(db, "rankings")
    assert list(row) == list(RANKING_COLUMNS)
    assert row["k"] == 4 and row["batch"] == "prov-batch" and row["split"] == "valid"
    assert row["labeler_held_out"] is True and row["cursor"] == str(ranking.id)
    assert [
        (c["text"], c["position"], c["rank"], c["likert"], c["model_version"], c["flags"]) for c in row["completions"]
    ] == [
        ("x", 0, 1, 6, "base-1", []),
        ("z", 1, 4, 1, "policy-7", ["hallucination"]),
        ("w", 2, 3, 2, "policy-7", []),
        ("y", 3, 2, 5, None, []),
    ]
    comparisons = run_export(db, "comparisons")
    assert comparisons[0]["chosen_model_version"] == "base-1" and comparisons[0]["rejected_model_version"] is None
    assert comparisons[0]["submitted_at"] == T0.isoformat()


def test_labeler_ids_are_stable_keyed_pseudonyms(db):
    batch, labeler = add_batch(db), add_user(db)
    add_ranking(db, batch, labeler, [1, 2, 3, 4])
    first, second = run_export(db, "comparisons"), run_export(db, "comparisons")
    pseudonym = first[0]["labeler"]
    assert {r["labeler"] for r in first + second} == {pseudonym}
    assert pseudonym == labeler_pseudonym(get_settings().secret_key, labeler.id)
    assert pseudonym != labeler_pseudonym("another-deployment", labeler.id)
    assert re.fullmatch(r"lab_[0-9a-f]{16}", pseudonym)
    assert labeler.username not in json.dumps(first)


# --- filters ------------------------------------------------------------------------------------


@pytest.fixture
def world(db):
    """Six rankings that differ in one attribute each, plus demonstrations."""
    alice, bob, carol = add_user(db), add_user(db), add_user(db)
    a, b = add_batch(db, "batch-a"), add_batch(db, "batch-b")
    v1, v2 = add_version(db, "policy-v1"), add_version(db, "policy-v2")
    shared = add_task(db, a, 4)
    r = {
        "plain": add_ranking(db, a, alice, [1, 2, 3, 4], versions=[v1] * 4),
        "other_batch": add_ranking(db, b, alice, [1, 2, 3, 4], versions=[v1] * 4),
        "valid": add_ranking(db, a, alice, [1, 2, 3, 4], split="valid", versions=[v1] * 4),
        "late_bob": add_ranking(db, a, bob, [1, 2, 3, 4], created_at=T0 + timedelta(days=2), versions=[v1] * 4),
        "flagged": add_ranking(db, a, alice, [1, 1, 2, 2], all_unacceptable=True, versions=[v1] * 4),
        "v2": add_ranking(db, a, alice, [1, 2, 3, 4], versions=[v1, v2, v1, v1]),
        "overlap1": add_ranking(db, a, alice, [1, 2, 3, 4], task=shared),
        "overlap2": add_ranking(db, a, bob, [2, 1, 3, 4], task=shared),
    }
    d = {
        "alice": add_demonstration(db, a, alice, "drow"),
        "bob_late": add_demonstration(db, b, bob, "olleh", created_at=T0 + timedelta(days=3)),
    }
    return {"rankings": r, "demos": d, "users": (alice, bob, carol), "batches": (a, b), "versions": (v1, v2)}


def ids(rows, key="ranking_id"):
    return sorted({row[key] for row in rows})


def expect(world, *names):
    return sorted(world["rankings"][n].id for n in names)


ALL = ("plain", "other_batch", "valid", "late_bob", "flagged", "v2", "overlap1", "overlap2")


def test_each_filter_selects_exactly_its_rankings(db, world):
    alice, bob, carol = world["users"]
    secret = get_settings().secret_key
    cases = {
        (): ALL,
        (("batch", "batch-b"),): ("other_batch",),
        (("batch", str(world["batches"][1].id)),): ("other_batch",),
        (("split", "valid"),): ("valid",),
        (("since", T0 + timedelta(days=1)),): ("late_bob",),
        (("until", T0 + timedelta(days=1)),): tuple(n for n in ALL if n != "late_bob"),
        (("labeler", labeler_pseudonym(secret, bob.id)),): ("late_bob", "overlap2"),
        (("labeler", labeler_pseudonym(secret, carol.id)),): (),
        (("model_version", "policy-v2"),): ("v2",),
        (("model_version", str(world["versions"][0].id)),): (
            "plain",
            "other_batch",
            "valid",
            "late_bob",
            "flagged",
            "v2",
        ),
        (("min_overlap", 2),): ("overlap1", "overlap2"),
        (("exclude_flagged", True),): tuple(n for n in ALL if n != "flagged"),
        (("batch", "batch-a"), ("labeler", labeler_pseudonym(secret, alice.id)), ("exclude_flagged", True)): (
            "plain",
            "valid",
            "v2",
            "overlap1",
        ),
    }
    for filters, names in cases.items():
        assert ids(run_export(db, "rankings", **dict(filters))) == expect(world, *names), filters
        assert ids(run_export(db, "comparisons", **dict(filters))) == expect(world, *names), filters


def test_filters_on_demonstrations(db, world):
    alice, _bob, _ = world["users"]
    demos = world["demos"]
    rows = run_export(db, "demonstrations")
    assert [r["completion"] for r in rows] == ["drow", "olleh"]
    assert list(rows[0]) == list(DEMONSTRATION_COLUMNS)
    assert rows[0]["prompt"].startswith("Reverse the word") and rows[0]["cursor"] == str(demos["alice"].id)
    secret = get_settings().secret_key
    assert ids(run_export(db, "demonstrations", batch="batch-b"), "demonstration_id") == [demos["bob_late"].id]
    assert ids(run_export(db, "demonstrations", labeler=labeler_pseudonym(secret, alice.id)), "demonstration_id") == [
        demos["alice"].id
    ]
    assert ids(run_export(db, "demonstrations", since=T0 + timedelta(days=1)), "demonstration_id") == [
        demos["bob_late"].id
    ]
    assert run_export(db, "demonstrations", min_overlap=2) == []


@pytest.mark.parametrize(
    ("kind", "filters", "param"),
    [
        ("rankings", {"batch": "no-such-batch"}, "batch"),
        ("rankings", {"batch": "999999"}, "batch"),
        ("comparisons", {"labeler": "lab_0000000000000000"}, "labeler"),
        ("comparisons", {"model_version": "policy-v404"}, "model_version"),
        ("rankings", {"split": "holdout"}, "split"),
        ("rankings", {"min_overlap": 0}, "min_overlap"),
        ("rankings", {"since": T0, "until": T0}, "until"),
        ("demonstrations", {"model_version": "policy-v1"}, "model_version"),
        ("demonstrations", {"exclude_flagged": True}, "exclude_flagged"),
    ],
)
def test_bad_filters_name_the_parameter(db, world, kind, filters, param):
    with pytest.raises(export_service.ExportError) as err:
        resolve_filters(db.connection(), kind, get_settings().secret_key, **filters)
    assert err.value.param == param


# --- cursor -------------------------------------------------------------------------------------


def test_resume_after_a_cut_at_any_row_gives_no_gaps_or_repeats(db):
    batch, labeler = add_batch(db), add_user(db)
    rng = random.Random(5)
    for _ in range(12):
        k = rng.randint(4, 9)
        add_ranking(db, batch, labeler, [rng.randint(1, k) for _ in range(k)])
    for kind in ("comparisons", "rankings"):
        full = run_export(db, kind)
        assert len(full) > 20 if kind == "comparisons" else len(full) == 12
        for cut in range(1, len(full)):
            resumed = run_export(db, kind, cursor=full[cut - 1]["cursor"])
            assert resumed == full[cut:], (kind, cut)
    # A bare ranking id as a comparisons cursor means "after that whole ranking".
    full = run_export(db, "comparisons")
    first = full[0]["ranking_id"]
    assert run_export(db, "comparisons", cursor=str(first)) == [r for r in full if r["ranking_id"] != first]


# PostgreSQL snapshots read committed data, which the rolled-back `db` never is: the live-server tests below.
@pytest.mark.sqlite(only=True)
def test_the_embedded_default_exports_from_a_snapshot_too(db, monkeypatch):
    batch, labeler = add_batch(db), add_user(db)
    for _ in range(30):
        add_ranking(db, batch, labeler, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    db.commit()
    monkeypatch.setattr(export_service, "YIELD_PER", 7)
    monkeypatch.setattr(export_service, "CHUNK_CHARS", 2000)
    # Resolving the batch name is the snapshot's first read; everything after must see the same data.
    export = SnapshotExport(db.get_bind(), "comparisons", secret_key=get_settings().secret_key, batch=batch.name)
    chunks = export.chunks()
    try:
        add_ranking(db, batch, labeler, [1, 2, 3, 4])  # a labeler submits before and while it streams
        db.commit()
        received = [next(chunks)]
        add_ranking(db, batch, labeler, [1, 2, 3, 4])
        db.commit()
        assert export.count_units() == 30
        received.extend(chunks)
    finally:
        chunks.close()
    rows = b"".join(received).decode().splitlines()
    assert len(rows) == 30 * 36
    assert len(run_export(db, "comparisons")) == 30 * 36 + 2 * 6


def test_csv_has_the_header_and_the_same_rows_as_jsonl(db, world):
    for kind, columns in (
        ("comparisons", COMPARISON_COLUMNS),
        ("rankings", RANKING_COLUMNS),
        ("demonstrations", DEMONSTRATION_COLUMNS),
    ):
        table = run_export(db, kind, fmt="csv")
        rows = run_export(db, kind)
        assert tuple(table[0]) == columns
        assert len(table) == len(rows) + 1
        by_column = [dict(zip(columns, line, strict=True)) for line in table[1:]]
        assert [r["cursor"] for r in by_column] == [r["cursor"] for r in rows]
        assert [r["prompt"] for r in by_column] == [r["prompt"] for r in rows]
        if kind == "comparisons":
            assert [(r["chosen"], r["rejected"], float(r["weight"])) for r in by_column] == [
                (r["chosen"], r["rejected"], r["weight"]) for r in rows
            ]
        if kind == "rankings":
            assert [json.loads(r["completions"]) for r in by_column] == [r["completions"] for r in rows]


@pytest.mark.parametrize(
    ("text", "kind"), [("12:x", "comparisons"), ("12:3", "rankings"), ("abc", "rankings"), ("-1", "demonstrations")]
)
def test_bad_cursor_is_refused(text, kind):
    with pytest.raises(export_service.ExportError) as err:
        parse_cursor(kind, text)
    assert err.value.param == "cursor"


# --- access and validation over HTTP ------------------------------------------------------------


def test_export_needs_the_export_scope(client, db):
    admin, labeler = add_user(db, "admin"), add_user(db)
    reader, _ = create_api_token(db, admin, ["export:read"])
    admin_labeling, _ = create_api_token(db, admin, ["label"])
    labeling, _ = create_api_token(db, labeler, ["label"])
    for kind in ("demonstrations", "comparisons", "rankings"):
        url = f"/api/v1/export/{kind}"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"authorization": "Bearer il_not-a-token"}).status_code == 401
        assert client.get(url, headers={"authorization": f"Bearer {labeling}"}).status_code == 403
        assert client.get(url, headers={"authorization": f"Bearer {admin_labeling}"}).status_code == 403
        ok = client.get(url, headers={"authorization": f"Bearer {reader}"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/x-ndjson")
    # What the allowed export holds: `test_http_export_streams_the_service_rows` (SQLite) and the live tests.


# The HTTP export reads a snapshot on a connection of its own: on SQLite the test's committed rows are there;
# on PostgreSQL the `db` transaction is never committed, so the live-server tests below read committed data.
@pytest.mark.sqlite(only=True)
def test_http_export_streams_the_service_rows(client, db):
    admin, labeler = add_user(db, "admin"), add_user(db)
    batch = add_batch(db)
    for ranks in ([1, 2, 3, 4], [1, 1, 2, 3], [2, 1, 1, 1]):
        add_ranking(db, batch, labeler, ranks)
    add_demonstration(db, batch, labeler, "olleh")
    reader, _ = create_api_token(db, admin, ["export:read"])
    db.commit()
    auth = {"authorization": f"Bearer {reader}"}
    for kind, n_rows in (("comparisons", 6 + 5 + 3), ("rankings", 3), ("demonstrations", 1)):
        response = client.get(f"/api/v1/export/{kind}", headers=auth)
        assert response.status_code == 200
        rows = [json.loads(line) for line in response.text.splitlines()]
        assert rows == run_export(db, kind) and len(rows) == n_rows, kind
        assert all(set(row) == set(export_service.COLUMNS[kind]) for row in rows)
    (demo,) = [json.loads(line) for line in client.get("/api/v1/export/demonstrations", headers=auth).text.splitlines()]
    assert demo["completion"] == "olleh" and demo["prompt"].startswith("Reverse the word")
    table = client.get("/api/v1/export/rankings?format=csv", headers=auth)
    assert table.headers["content-type"].startswith("text/csv")
    header, *body = list(csv.reader(io.StringIO(table.text)))
    assert tuple(header) == RANKING_COLUMNS and len(body) == 3


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("split=holdout", "split"),
        ("since=yesterday", "since"),
        ("min_overlap=0", "min_overlap"),
        ("min_overlap=two", "min_overlap"),
        ("format=parquet", "format"),
        ("compress=brotli", "compress"),
        ("batch=no-such-batch", "batch"),
        ("labeler=lab_nobody", "labeler"),
        ("exclude_flagged=maybe", "exclude_flagged"),
        ("labler=lab_typo", "labler"),
        ("since=2026-11-02T00:00:00&until=2026-11-01T00:00:00", "until"),
    ],
)
def test_bad_filters_are_a_422_naming_the_parameter(client, db, query, param):
    admin = add_user(db, "admin")
    token, _ = create_api_token(db, admin, ["export:read"])
    response = client.get(f"/api/v1/export/comparisons?{query}", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{param}:"), response.json()


# --- live server, committed data ----------------------------------------------------------------


@pytest.fixture
def committed_world(committed_session):
    """Committed rankings, demonstrations and an export token, for the real server to read."""
    db = committed_session
    admin, labeler = add_user(db, "admin"), add_user(db)
    batch = add_batch(db, "live-batch")
    rng = random.Random(11)
    for _ in range(40):
        k = rng.randint(4, 9)
        add_ranking(
            db,
            batch,
            labeler,
            [rng.randint(1, k) for _ in range(k)],
            texts=[f'output {i} with "quotes", commas, ünïcode\nand a newline' for i in range(k)],
        )
    for n in range(5):
        add_demonstration(db, batch, labeler, f"demo {n}")
    token, _ = create_api_token(db, admin, ["export:read"])
    db.commit()
    return {"db": db, "token": token, "batch": batch, "labeler": labeler}


def get(live_server, token, kind, **params):
    return httpx.get(
        f"{live_server}/api/v1/export/{kind}",
        params=params,
        timeout=60,
        headers={"authorization": f"Bearer {token}", "accept-encoding": "identity"},
    )


def test_live_export_resumes_after_a_byte_level_cut(live_server, committed_world):
    token = committed_world["token"]
    full = get(live_server, token, "comparisons")
    assert full.status_code == 200 and "content-encoding" not in full.headers
    assert full.headers["x-export-cursor-field"] == "cursor"
    body = full.content
    lines = body.decode().splitlines()
    rng = random.Random(3)
    for cut in [1, len(body) // 3, len(body) - 2] + [rng.randrange(1, len(body)) for _ in range(5)]:
        received = body[:cut]
        complete = received[: received.rfind(b"\n") + 1].decode().splitlines()
        params = {"cursor": json.loads(complete[-1])["cursor"]} if complete else {}
        rest = get(live_server, token, "comparisons", **params).content.decode().splitlines()
        assert complete + rest == lines, cut


def test_live_export_gzip_both_ways_and_csv(live_server, committed_world):
    token = committed_world["token"]
    plain = get(live_server, token, "comparisons").content
    as_file = get(live_server, token, "comparisons", compress="gzip")
    assert as_file.headers["content-type"] == "application/gzip"
    assert 'filename="comparisons.jsonl.gz"' in as_file.headers["content-disposition"]
    assert gzip.decompress(as_file.content) == plain
    transfer = httpx.get(
        f"{live_server}/api/v1/export/comparisons",
        timeout=60,
        headers={"authorization": f"Bearer {token}", "accept-encoding": "gzip"},
    )
    assert transfer.headers["content-encoding"] == "gzip" and transfer.content == plain
    assert "content-length" not in transfer.headers  # streamed, not buffered
    table = get(live_server, token, "comparisons", format="csv")
    assert table.headers["content-type"].startswith("text/csv")
    reader = csv.DictReader(io.StringIO(table.text))
    assert tuple(reader.fieldnames) == COMPARISON_COLUMNS
    csv_rows = list(reader)
    json_rows = [json.loads(line) for line in plain.decode().splitlines()]
    assert [(r["chosen"], r["cursor"]) for r in csv_rows] == [(r["chosen"], r["cursor"]) for r in json_rows]
    assert "\n" in csv_rows[0]["chosen"]  # quoting keeps embedded newlines inside one cell


def test_exports_load_with_datasets_in_the_columns_trl_expects(live_server, committed_world, tmp_path):
    import datasets

    token = committed_world["token"]
    expected = {
        "demonstrations": ({"prompt", "completion"}, 5),
        "comparisons": ({"prompt", "chosen", "rejected"}, None),
        "rankings": ({"prompt", "completions"}, 40),
    }
    for kind, (trl_columns, count) in expected.items():
        path = tmp_path / f"{kind}.jsonl"
        path.write_bytes(get(live_server, token, kind).content)
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
        assert trl_columns <= set(dataset.column_names)
        assert set(dataset.column_names) == set(export_service.COLUMNS[kind])
        for column in trl_columns - {"completions"}:
            assert all(isinstance(value, str) and value for value in dataset[column])
        if count is not None:
            assert dataset.num_rows == count
    comparisons = datasets.load_dataset(
        "json", data_files=str(tmp_path / "comparisons.jsonl"), split="train", cache_dir=str(tmp_path / "hf")
    )
    rankings = [json.loads(x) for x in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    pairs = sum(len(comparison_pairs(tuple(sorted(c["rank"] for c in r["completions"])))) for r in rankings)
    assert comparisons.num_rows == pairs


def _snapshot_ids(rows):
    return sorted({row["ranking_id"] for row in rows})


def test_an_export_is_a_snapshot_under_concurrent_submissions(committed_world, monkeypatch):
    db, batch, labeler = committed_world["db"], committed_world["batch"], committed_world["labeler"]
    before = db.scalars(select(Ranking.id).order_by(Ranking.id)).all()
    with_pairs = db.scalars(
        select(RankingItem.ranking_id)
        .group_by(RankingItem.ranking_id)
        .having(func.count(RankingItem.rank.distinct()) > 1)
        .order_by(RankingItem.ranking_id)
    ).all()
    # Small fetches and chunks, so the stream is still reading when the new rankings commit.
    monkeypatch.setattr(export_service, "YIELD_PER", 7)
    monkeypatch.setattr(export_service, "CHUNK_CHARS", 2000)
    export = SnapshotExport(get_engine(), "comparisons", secret_key=get_settings().secret_key)
    chunks = export.chunks()
    try:
        received = [next(chunks)]
        for _ in range(5):
            add_ranking(db, batch, labeler, [1, 2, 3, 4, 5, 6, 7, 8, 9])
        db.commit()
        assert export.count_units() == len(before)  # a later statement still sees the first snapshot
        received.extend(chunks)
    finally:
        chunks.close()  # an open snapshot would block the TRUNCATE that empties the tables afterwards
    rows = [json.loads(line) for line in b"".join(received).decode().splitlines()]
    assert _snapshot_ids(rows) == with_pairs
    # A fresh export sees the new rankings.
    fresh = SnapshotExport(get_engine(), "rankings", secret_key=get_settings().secret_key)
    assert len(b"".join(fresh.chunks()).splitlines()) == len(before) + 5


def test_live_export_never_tears_a_ranking_while_labelers_submit(live_server, committed_world):
    db, batch, labeler, token = (committed_world[k] for k in ("db", "batch", "labeler", "token"))
    stop = threading.Event()

    def submit():
        for _ in range(300):
            if stop.is_set():
                break
            add_ranking(db, batch, labeler, [1, 2, 2, 3, 4, 5, 6, 7, 8])
            db.commit()

    writer = threading.Thread(target=submit)
    writer.start()
    try:
        exports = [get(live_server, token, "comparisons").content.decode().splitlines() for _ in range(3)]
    finally:
        stop.set()
        writer.join()
    for lines in exports:
        rows = [json.loads(line) for line in lines]
        for ranking_id, group in itertools.groupby(rows, key=lambda r: r["ranking_id"]):
            group = list(group)
            assert [r["cursor"] for r in group] == [f"{ranking_id}:{n}" for n in range(len(group))]
            assert len(group) == round(1 / group[0]["weight"])  # every pair of the ranking, none missing


def test_cli_export_writes_the_same_rows_as_the_api(live_server, committed_world, tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli

    out = tmp_path / "comparisons.jsonl"
    result = CliRunner().invoke(cli, ["export", "comparisons", "--out", str(out), "--batch", "live-batch"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == get(live_server, committed_world["token"], "comparisons").content
    for args, param in (
        (["--split", "holdout"], "split"),
        (["--format", "parquet"], "format"),
        (["--since", "last week"], "since"),
    ):
        bad = CliRunner().invoke(cli, ["export", "comparisons", "--out", str(out), *args])
        assert bad.exit_code == 2 and f"{param}:" in bad.output, bad.output


def test_a_client_hanging_up_ends_the_snapshot_at_once(committed_world, monkeypatch):
    import anyio

    from app.main import create_app

    monkeypatch.setattr(export_service, "CHUNK_CHARS", 500)  # hundreds of chunks, so the hang-up is mid-stream
    closed = []
    close = export_service.close_snapshot
    monkeypatch.setattr(export_service, "close_snapshot", lambda conn: (closed.append(conn), close(conn)))
    application = create_app()
    bodies = []
    closed_when_done = []

    async def hang_up_after_the_first_chunk():
        hung_up = anyio.Event()

        async def receive():
            await hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message):  # like uvicorn, sending after a hang-up is silently dropped
            if message["type"] == "http.response.body" and message.get("body"):
                bodies.append(message["body"])
                hung_up.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/api/v1/export/comparisons",
            "raw_path": b"",
            "root_path": "",
            "query_string": b"",
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1),
            "headers": [
                (b"host", b"testserver"),
                (b"authorization", f"Bearer {committed_world['token']}".encode()),
                (b"accept-encoding", b"identity"),
            ],
        }
        with anyio.fail_after(30):
            await application(scope, receive, send)
        closed_when_done.append(len(closed))

    # In a thread of its own: Playwright's sync API (browser tests) keeps an event loop in the main thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, hang_up_after_the_first_chunk).result()
    full = len(get_snapshot_rows(committed_world))
    assert closed_when_done == [1]
    assert sum(body.count(b"\n") for body in bodies) < full / 2


def get_snapshot_rows(world):
    secret = get_settings().secret_key
    return b"".join(SnapshotExport(get_engine(), "comparisons", secret_key=secret).chunks()).splitlines()


def test_the_export_api_is_documented(client):
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    comparisons = paths["/api/v1/export/comparisons"]["get"]
    assert {p["name"] for p in comparisons["parameters"]} >= {
        "format",
        "compress",
        "batch",
        "split",
        "since",
        "until",
        "labeler",
        "model_version",
        "min_overlap",
        "exclude_flagged",
        "cursor",
    }
    assert "application/x-ndjson" in comparisons["responses"]["200"]["content"]


# --- webhooks -----------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers the first `failures` requests with a 500."""

    def __init__(self, failures: int):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers), body))
                failing = len(receiver.requests) <= failures
                self.send_response(500 if failing else 204)
                self.end_headers()
                if failing:
                    self.wfile.write(b"receiver is down")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/instructloop"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(failures=0):
        made.append(Receiver(failures))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_receiver_that_fails_twice_gets_the_signed_event_on_the_third_try(db, receiver):
    from app.models import WebhookDelivery
    from app.webhooks import service as webhooks

    flaky = receiver(failures=2)
    hook = webhooks.create_webhook(db, flaky.url, ["batch.completed", "model_version.promoted"])
    other = webhooks.create_webhook(db, flaky.url + "/other", ["training_run.failed"])
    (delivery,) = webhooks.emit_event(db, "batch.completed", {"batch_id": 7, "name": "batch-7"})
    assert delivery.webhook_id == hook.id and other.id != hook.id
    now = datetime.now(UTC)
    assert webhooks.deliver_due(db, now=now).retrying == 1
    assert webhooks.deliver_due(db, now=now + timedelta(seconds=9)).retrying == 0  # backing off: nothing due
    assert webhooks.deliver_due(db, now=now + timedelta(seconds=10)).retrying == 1
    assert webhooks.deliver_due(db, now=now + timedelta(seconds=29)) == webhooks.DeliveryReport()
    assert webhooks.deliver_due(db, now=now + timedelta(seconds=30)).delivered == 1
    assert webhooks.deliver_due(db, now=now + timedelta(days=1)) == webhooks.DeliveryReport()  # never sent again
    assert len(flaky.requests) == 3
    bodies = {body for _, body in flaky.requests}
    assert len(bodies) == 1  # the same event each time
    for headers, body in flaky.requests:
        assert webhooks.verify_signature(
            hook.secret, headers["X-InstructLoop-Timestamp"], body, headers["X-InstructLoop-Signature"]
        )
        assert not webhooks.verify_signature(
            other.secret, headers["X-InstructLoop-Timestamp"], body, headers["X-InstructLoop-Signature"]
        )
        assert not webhooks.verify_signature(
            hook.secret, headers["X-InstructLoop-Timestamp"], body + b" ", headers["X-InstructLoop-Signature"]
        )
        assert headers["X-InstructLoop-Event"] == "batch.completed"
    event = json.loads(bodies.pop())
    assert event["event"] == "batch.completed" and event["data"] == {"batch_id": 7, "name": "batch-7"}
    db.refresh(delivery)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 3, 204)
    assert db.scalar(select(func.count()).select_from(WebhookDelivery)) == 1  # the other webhook is not subscribed


def test_a_dead_receiver_is_given_up_after_the_last_attempt(db, receiver):
    from app.webhooks import service as webhooks

    dead = receiver(failures=100)
    hook = webhooks.create_webhook(db, dead.url, ["training_run.failed"])
    (delivery,) = webhooks.emit_event(db, "training_run.failed", {"run_id": 3})
    now = datetime.now(UTC)
    for _ in range(webhooks.MAX_ATTEMPTS + 2):
        webhooks.deliver_due(db, now=now)
        now += webhooks.MAX_RETRY
    db.refresh(delivery)
    assert (delivery.status, delivery.attempts) == ("failed", webhooks.MAX_ATTEMPTS)
    assert delivery.last_error.startswith("HTTP 500") and len(dead.requests) == webhooks.MAX_ATTEMPTS
    headers, body = dead.requests[-1]
    assert webhooks.verify_signature(
        hook.secret, headers["X-InstructLoop-Timestamp"], body, headers["X-InstructLoop-Signature"]
    )
    assert not webhooks.verify_signature(
        hook.secret,
        headers["X-InstructLoop-Timestamp"],
        body,
        headers["X-InstructLoop-Signature"],
        now=time.time() + 3600,
    )  # replayed


def test_admins_manage_webhooks_and_read_the_delivery_log(client, db, receiver):
    from app.webhooks import service as webhooks

    admin = add_user(db, "admin")
    token, _ = create_api_token(db, admin, ["admin"])
    reader, _ = create_api_token(db, admin, ["export:read"])
    auth = {"authorization": f"Bearer {token}"}
    target = receiver()
    assert client.get("/api/v1/webhooks").status_code == 401
    assert client.get("/api/v1/webhooks", headers={"authorization": f"Bearer {reader}"}).status_code == 403
    bad = client.post(
        "/api/v1/webhooks", json={"url": "ftp://example.org", "events": ["batch.completed"]}, headers=auth
    )
    assert bad.status_code == 422 and bad.json()["detail"].startswith("url:")
    bad = client.post("/api/v1/webhooks", json={"url": target.url, "events": ["batch.done"]}, headers=auth)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("events:")
    created = client.post(
        "/api/v1/webhooks", json={"url": target.url, "events": ["model_version.registered"]}, headers=auth
    )
    assert created.status_code == 201 and created.json()["secret"].startswith("whsec_")
    hook_id = created.json()["id"]
    assert [h["id"] for h in client.get("/api/v1/webhooks", headers=auth).json()] == [hook_id]
    assert "secret" not in client.get("/api/v1/webhooks", headers=auth).json()[0]
    webhooks.emit_event(db, "model_version.registered", {"model_version": "sft-3"})
    webhooks.deliver_due(db)
    log = client.get(f"/api/v1/webhooks/{hook_id}/deliveries", headers=auth).json()
    assert [(d["event"], d["status"], d["attempts"], d["last_status_code"]) for d in log] == [
        ("model_version.registered", "delivered", 1, 204)
    ]
    assert client.delete(f"/api/v1/webhooks/{hook_id}", headers=auth).status_code == 204
    assert client.delete(f"/api/v1/webhooks/{hook_id}", headers=auth).status_code == 404
    assert webhooks.emit_event(db, "model_version.registered", {"model_version": "sft-4"}) == []
