"""The admin's batch API: create, edit, move through the lifecycle, import prompts with hygiene, start."""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import func, select

from app.models import Prompt, PromptBatch, Task, TrainingRun
from app.security import create_api_token
from tests.factories import ModelVersionFactory, UserFactory


def jsonl(*records) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n").encode()


def make_batch(client, auth, **fields) -> dict:
    response = client.post("/api/v1/batches", json={"name": "b1", **fields}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


def upload(client, auth, batch_id, data: bytes, content_type="application/jsonl", **params):
    return client.post(
        f"/api/v1/batches/{batch_id}/prompts",
        content=data,
        params=params,
        headers={**auth, "content-type": content_type},
    )


def stored(db, batch_id) -> int:
    return db.scalar(select(func.count()).where(Prompt.batch_id == batch_id))


# --- create, list, get, patch ------------------------------------------------------------------


def test_create_list_get_with_defaults(client, auth, admin):
    created = make_batch(client, auth, guidelines="Prefer short answers.", k=6)
    assert created["status"] == "draft"
    assert (created["k"], created["overlap"], created["pii_policy"], created["wants_rankings"]) == (6, 1, "drop", True)
    assert created["progress"] == {"prompts": 0, "samples": 0, "tasks": {}}

    listed = client.get("/api/v1/batches", headers=auth).json()
    assert [b["name"] for b in listed] == ["b1"]
    got = client.get(f"/api/v1/batches/{created['id']}", headers=auth).json()
    assert got["guidelines"] == "Prefer short answers."
    assert client.get("/api/v1/batches/999999", headers=auth).status_code == 404


def test_create_refuses_bad_fields_naming_them(client, auth):
    make_batch(client, auth)
    duplicate = client.post("/api/v1/batches", json={"name": "b1"}, headers=auth)
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
    for body, field in [
        ({"name": "x", "k": 10}, "k"),
        ({"name": "x", "k": 3}, "k"),
        ({"name": "x", "top_p": 0}, "top_p"),
        ({"name": "x", "pii_policy": "ignore"}, "pii_policy"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": ""}, "name"),
        ({"guidelines": "no name"}, "name"),
    ]:
        response = client.post("/api/v1/batches", json=body, headers=auth)
        assert response.status_code == 422, body
        assert [e["field"] for e in response.json()["errors"]] == [field], response.json()
    neither = client.post(
        "/api/v1/batches", json={"name": "x", "wants_demonstrations": False, "wants_rankings": False}, headers=auth
    )
    assert neither.status_code == 422 and neither.json()["detail"].startswith("wants_rankings")
    missing_model = client.post("/api/v1/batches", json={"name": "x", "policy_version_id": 424242}, headers=auth)
    assert missing_model.status_code == 422 and missing_model.json()["detail"].startswith("policy_version_id")


def test_patch_edits_and_transitions(client, auth, db):
    batch = make_batch(client, auth)
    url = f"/api/v1/batches/{batch['id']}"
    edited = client.patch(url, json={"guidelines": "New rules", "k": 7, "priority": 5}, headers=auth)
    assert edited.status_code == 200 and (edited.json()["k"], edited.json()["priority"]) == (7, 5)

    refused = client.patch(url, json={"status": "labeling"}, headers=auth)
    assert refused.status_code == 409 and "cannot go from draft to labeling" in refused.json()["detail"]
    no_prompts = client.patch(url, json={"status": "sampling"}, headers=auth)  # only through start
    assert no_prompts.status_code == 409 and no_prompts.json()["detail"].startswith("prompts")

    # Move a batch along by hand to labeling, then pause, resume, complete, archive.
    row = db.get(PromptBatch, batch["id"])
    row.status = "labeling"
    db.flush()
    frozen = client.patch(url, json={"k": 5}, headers=auth)
    assert frozen.status_code == 409 and frozen.json()["detail"].startswith("k: can only change while")
    assert client.patch(url, json={"guidelines": "Clarified"}, headers=auth).status_code == 200
    for target in ("paused", "labeling", "completed", "archived"):
        response = client.patch(url, json={"status": target}, headers=auth)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == target
    read_only = client.patch(url, json={"guidelines": "late"}, headers=auth)
    assert read_only.status_code == 409 and "read-only" in read_only.json()["detail"]
    assert client.patch(url, json={"status": "draft"}, headers=auth).status_code == 409
    assert client.get(url, headers=auth).json()["status"] == "archived"


def test_patch_refuses_unknown_status(client, auth):
    batch = make_batch(client, auth)
    response = client.patch(f"/api/v1/batches/{batch['id']}", json={"status": "finished"}, headers=auth)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "status"


# --- import ------------------------------------------------------------------------------------

HYGIENE_FILE = [
    {"text": "What is 2 + 2?", "source_user_id": "u1"},
    {"text": "  what IS 2 +   2? ", "source_user_id": "u2"},  # duplicate of line 1
    {"text": "Write to me at bob@example.com please", "source_user_id": "u4"},  # pii
    {"text": "Summarise the following article about cats", "source_user_id": "u5"},
    {"text": "Summarise the following article about dogs", "source_user_id": "u6"},  # shared prefix (20)
    {"text": "Translate hello to French", "source_user_id": "u3", "category": "few-shot"},
    {"text": "Name three primary colours", "source_user_id": "u3", "metadata": {"topic": "art"}},
    {"text": "Sort the numbers 3 1 2 please", "source_user_id": "u3"},  # over the cap of 2
]


@pytest.mark.sqlite
def test_import_jsonl_applies_every_hygiene_rule(client, auth, db):
    batch = make_batch(client, auth)
    response = upload(client, auth, batch["id"], jsonl(*HYGIENE_FILE), prefix_chars=20, max_per_user=2)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["stored"] == 4 and body["replaced"] == 0
    report = body["hygiene"]
    assert {
        k: report[k] for k in ("received", "kept", "duplicates", "pii_dropped", "shared_prefix", "over_user_limit")
    } == {"received": 8, "kept": 4, "duplicates": 1, "pii_dropped": 1, "shared_prefix": 1, "over_user_limit": 1}
    assert report["pii_kinds"]["email"] == 1
    assert sum(report["splits"].values()) == 4
    assert [(d["line"], d["rule"]) for d in body["dropped"]] == [
        (2, "duplicate"),
        (3, "pii"),
        (5, "shared_prefix"),
        (8, "over_user_limit"),
    ]
    rows = db.scalars(select(Prompt).where(Prompt.batch_id == batch["id"]).order_by(Prompt.source_line)).all()
    assert [p.source_line for p in rows] == [1, 4, 6, 7]
    assert rows[2].category == "few-shot"
    assert len({p.split for p in rows if p.source_user_id == "u3"}) == 1  # a user's prompts share a split

    download = client.get(body["dropped_csv"], headers=auth)
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(download.text)))
    assert lines[0] == ["line", "rule", "detail"]
    assert [(r[0], r[1]) for r in lines[1:]] == [
        ("2", "duplicate"),
        ("3", "pii"),
        ("5", "shared_prefix"),
        ("8", "over_user_limit"),
    ]
    listed = client.get(f"/api/v1/batches/{batch['id']}", headers=auth).json()
    assert listed["progress"]["prompts"] == 4 and listed["hygiene"]["kept"] == 4

    again = upload(client, auth, batch["id"], jsonl(*HYGIENE_FILE[:1]))
    assert again.status_code == 201 and again.json()["stored"] == 0
    assert again.json()["hygiene"]["duplicates_of_earlier_batches"] == 1


def test_import_stores_metadata(client, auth, db):
    batch = make_batch(client, auth)
    assert upload(client, auth, batch["id"], jsonl({"text": "Hi", "metadata": {"topic": "art"}})).status_code == 201
    assert db.scalar(select(Prompt.extra).where(Prompt.batch_id == batch["id"])) == {"topic": "art"}


def test_import_csv_with_pii_redacted(client, auth, db):
    batch = make_batch(client, auth, pii_policy="redact")
    data = (
        b"text,source_user_id,category,metadata\n"
        b"Call me on +1 415-555-0100 tomorrow,u1,plain,\n"
        b'"A prompt, with a comma",u2,user-based,"{""a"": 1}"\n'
    )
    response = upload(client, auth, batch["id"], data, content_type="text/csv")
    assert response.status_code == 201, response.text
    assert response.json()["stored"] == 2 and response.json()["hygiene"]["pii_redacted"] == 1
    texts = db.scalars(select(Prompt.text).where(Prompt.batch_id == batch["id"]).order_by(Prompt.source_line)).all()
    assert "415" not in texts[0] and "[PHONE]" in texts[0]
    assert texts[1] == "A prompt, with a comma"


def test_import_multipart_upload(client, auth, db):
    batch = make_batch(client, auth)
    response = client.post(
        f"/api/v1/batches/{batch['id']}/prompts",
        headers=auth,
        files={"file": ("prompts.csv", b"text\nHello there\nGoodbye now\n", "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    assert stored(db, batch["id"]) == 2
    no_file = client.post(
        f"/api/v1/batches/{batch['id']}/prompts",
        headers=auth,
        data={"other": "x"},
        files={"attachment": ("a.txt", b"x", "text/plain")},
    )
    assert no_file.status_code == 422 and no_file.json()["detail"].startswith("file")


def _errors(response) -> list[tuple[int, str | None]]:
    assert response.status_code == 422, response.text
    return [(e["line"], e["field"]) for e in response.json()["errors"]]


def test_every_jsonl_error_class_is_reported_by_line_and_field(client, auth, db):
    batch = make_batch(client, auth)
    data = (
        jsonl(
            {"text": "fine"},
            '{"text": "broken',  # 2 bad JSON
            {"source_user_id": "u1"},  # 3 missing text
            {"text": "   "},  # 4 empty text
            {"text": "x" * 20001},  # 5 over the maximum
            {"text": "ok", "category": "poem"},  # 6 unknown category
            {"text": "ok", "colour": "red"},  # 7 unknown field
            {"text": "ok", "metadata": [1, 2]},  # 8 metadata not an object
            {"text": 5},  # 9 text not a string
            "[1, 2]",  # 10 not an object
        )
        + b'{"text": "caf\xe9"}\n'
    )  # 11 invalid UTF-8
    response = upload(client, auth, batch["id"], data)
    assert _errors(response) == [
        (2, None),
        (3, "text"),
        (4, "text"),
        (5, "text"),
        (6, "category"),
        (7, "colour"),
        (8, "metadata"),
        (9, "text"),
        (10, None),
        (11, None),
    ]
    body = response.json()
    assert body["total"] == 10 and "nothing was imported" in body["detail"]
    messages = [e["message"] for e in body["errors"]]
    assert messages[0].startswith("invalid JSON") and "missing" in messages[1] and "empty" in messages[2]
    assert "maximum is 20000" in messages[3] and "invalid UTF-8" in messages[9]
    assert stored(db, batch["id"]) == 0
    assert db.get(PromptBatch, batch["id"]).hygiene_report == {}


def test_every_csv_error_class_is_reported(client, auth, db):
    batch = make_batch(client, auth)
    data = b'text,category\nfine,plain\ntoo,many,cells\n"",plain\nok,essay\nshort\n'
    assert _errors(upload(client, auth, batch["id"], data, content_type="text/csv")) == [
        (3, None),
        (4, "text"),
        (5, "category"),
        (6, None),
    ]
    assert _errors(upload(client, auth, batch["id"], b"prompt,user\nhi,u\n", content_type="text/csv")) == [
        (1, "prompt"),
        (1, "user"),
        (1, "text"),
    ]
    assert _errors(upload(client, auth, batch["id"], b"", content_type="text/csv")) == [(1, None)]
    assert _errors(upload(client, auth, batch["id"], "text\nhi\n".encode("utf-16"), content_type="text/csv")) == [
        (1, None)
    ]
    assert stored(db, batch["id"]) == 0


def test_binary_file_is_refused_clearly(client, auth, db):
    batch = make_batch(client, auth)
    response = client.post(
        f"/api/v1/batches/{batch['id']}/prompts",
        headers=auth,
        files={"file": ("prompts.xlsx", b"PK\x03\x04\x14\x00binary", "application/vnd.ms-excel")},
    )
    assert response.status_code == 415 and "binary" in response.json()["detail"]


def test_error_list_is_capped_at_100_with_the_total(client, auth, db):
    batch = make_batch(client, auth)
    data = jsonl(*[{"text": ""} for _ in range(150)])
    body = upload(client, auth, batch["id"], data).json()
    assert body["total"] == 150 and len(body["errors"]) == 100 and body["errors"][-1]["line"] == 100


def test_one_bad_line_among_10000_imports_nothing(client, auth, db):
    batch = make_batch(client, auth)
    records = [
        {"text": f"Prompt number {i} about topic {i * 7}", "source_user_id": f"u{i % 100}"} for i in range(10_000)
    ]
    records[7776] = {"text": "fine", "category": "limerick"}
    response = upload(client, auth, batch["id"], jsonl(*records))
    assert _errors(response) == [(7777, "category")] and response.json()["total"] == 1
    assert stored(db, batch["id"]) == 0
    records[7776] = {"text": "fine now"}
    response = upload(client, auth, batch["id"], jsonl(*records), max_per_user=1000)
    assert response.status_code == 201 and response.json()["stored"] == 10_000


def test_replace_only_while_draft_and_keeps_old_prompts_on_errors(client, auth, db):
    ModelVersionFactory()
    batch = make_batch(client, auth)
    first = jsonl({"text": "First prompt"}, {"text": "Second prompt"})
    assert upload(client, auth, batch["id"], first).json()["stored"] == 2
    second = jsonl({"text": "First prompt"}, {"text": "Third prompt"}, {"text": "Fourth prompt"})
    response = upload(client, auth, batch["id"], second, replace="true")
    assert response.status_code == 201 and (response.json()["replaced"], response.json()["stored"]) == (2, 3)
    assert stored(db, batch["id"]) == 3

    bad = jsonl({"text": "Fifth prompt"}, {"text": ""})
    assert upload(client, auth, batch["id"], bad, replace="true").status_code == 422
    assert sorted(db.scalars(select(Prompt.text).where(Prompt.batch_id == batch["id"]))) == [
        "First prompt",
        "Fourth prompt",
        "Third prompt",
    ]

    assert client.post(f"/api/v1/batches/{batch['id']}/start", headers=auth).status_code == 200
    late = upload(client, auth, batch["id"], jsonl({"text": "Sixth prompt"}), replace="true")
    assert late.status_code == 409 and "draft" in late.json()["detail"]
    assert upload(client, auth, batch["id"], jsonl({"text": "Sixth prompt"})).status_code == 409
    assert stored(db, batch["id"]) == 3


# --- start -------------------------------------------------------------------------------------


def test_start_without_prompts_is_refused(client, auth, db):
    ModelVersionFactory()
    batch = make_batch(client, auth)
    response = client.post(f"/api/v1/batches/{batch['id']}/start", headers=auth)
    assert response.status_code == 409 and response.json()["detail"].startswith("prompts")
    assert db.get(PromptBatch, batch["id"]).status == "draft"


def test_start_without_a_model_is_refused(client, auth, db):
    batch = make_batch(client, auth)
    upload(client, auth, batch["id"], jsonl({"text": "Hello"}))
    response = client.post(f"/api/v1/batches/{batch['id']}/start", headers=auth)
    assert response.status_code == 409 and response.json()["detail"].startswith("policy_version_id")


def test_start_queues_a_sample_run(client, auth, db):
    ModelVersionFactory()
    batch = make_batch(client, auth)
    upload(client, auth, batch["id"], jsonl({"text": "Hello"}, {"text": "Goodbye"}))
    response = client.post(f"/api/v1/batches/{batch['id']}/start", headers=auth)
    assert response.status_code == 200 and response.json()["status"] == "sampling"
    runs = db.scalars(select(TrainingRun).where(TrainingRun.batch_id == batch["id"])).all()
    assert [(r.kind, r.status, r.triggered_by) for r in runs] == [("sample", "queued", "batch-start")]
    assert client.post(f"/api/v1/batches/{batch['id']}/start", headers=auth).status_code == 409


def test_start_demonstrations_only_goes_straight_to_labeling(client, auth, db):
    batch = make_batch(client, auth, wants_rankings=False, overlap=2)
    upload(client, auth, batch["id"], jsonl({"text": "Hello"}, {"text": "Goodbye"}, {"text": "Thanks"}))
    response = client.post(f"/api/v1/batches/{batch['id']}/start", headers=auth)
    assert response.status_code == 200 and response.json()["status"] == "labeling"
    tasks = db.scalars(select(Task).where(Task.batch_id == batch["id"])).all()
    assert [(t.kind, t.needed) for t in tasks] == [("demonstration", 2)] * 3
    assert response.json()["progress"]["tasks"]["demonstration"] == {"done": 0, "needed": 6, "tasks": 3}


# --- who may ------------------------------------------------------------------------------------


def test_only_admins_may_use_the_batch_api(client, db, admin, login):
    labeler = UserFactory()
    export_only, _ = create_api_token(db, admin, ["export:read"])
    labeler_token, _ = create_api_token(db, labeler, ["label"])
    assert client.get("/api/v1/batches").status_code == 401
    assert client.post("/api/v1/batches", json={"name": "x"}).status_code == 401
    for raw in (export_only, labeler_token):
        headers = {"authorization": f"Bearer {raw}"}
        assert client.get("/api/v1/batches", headers=headers).status_code == 403
        assert client.post("/api/v1/batches", json={"name": "x"}, headers=headers).status_code == 403
    login(labeler.username)
    assert client.get("/api/v1/batches").status_code == 403


def test_admin_session_needs_the_csrf_header_to_write(client, db, admin, login):
    csrf = login(admin.username)
    assert client.get("/api/v1/batches").status_code == 200
    assert client.post("/api/v1/batches", json={"name": "x"}).status_code == 403
    created = client.post("/api/v1/batches", json={"name": "x"}, headers={"x-csrf-token": csrf})
    assert created.status_code == 201
    response = client.post(
        f"/api/v1/batches/{created.json()['id']}/prompts",
        data={"csrf_token": csrf},
        files={"file": ("p.jsonl", jsonl({"text": "Hi"}), "application/octet-stream")},
    )
    assert response.status_code == 201, response.text


def test_dropped_csv_lists_every_dropped_line_beyond_the_preview(client, auth, db):
    import csv
    import io
    import json

    batch = client.post("/api/v1/batches", json={"name": "many-dupes"}, headers=auth).json()
    lines = [json.dumps({"text": "the same prompt"}) for _ in range(1500)]
    response = client.post(
        f"/api/v1/batches/{batch['id']}/prompts",
        content="\n".join(lines),
        headers=auth | {"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 201
    rows = list(
        csv.reader(io.StringIO(client.get(f"/api/v1/batches/{batch['id']}/hygiene/dropped.csv", headers=auth).text))
    )
    assert rows[0] == ["line", "rule", "detail"]
    assert len(rows) - 1 == 1499 and {r[1] for r in rows[1:]} == {"duplicate"}


def test_split_fractions_are_configurable_and_validated(client, auth, db):
    import json

    batch = client.post("/api/v1/batches", json={"name": "all-valid"}, headers=auth).json()
    body = "\n".join(json.dumps({"text": f"prompt {i}", "source_user_id": f"u{i}"}) for i in range(50))
    bad = client.post(
        f"/api/v1/batches/{batch['id']}/prompts?split=0.5,0.5",
        content=body,
        headers=auth | {"content-type": "application/x-ndjson"},
    )
    assert bad.status_code == 422 and bad.json()["detail"].startswith("split:")
    ok = client.post(
        f"/api/v1/batches/{batch['id']}/prompts?split=0,1,0",
        content=body,
        headers=auth | {"content-type": "application/x-ndjson"},
    )
    assert ok.status_code == 201
    from sqlalchemy import select

    from app.models import Prompt

    assert set(db.scalars(select(Prompt.split).where(Prompt.batch_id == batch["id"]))) == {"valid"}


def test_a_small_import_gets_held_out_prompts_and_users_keep_their_split_in_later_batches(client, auth, db):
    import json

    from sqlalchemy import select

    from app.models import Prompt

    users = [f"demo-{i}" for i in range(6)]  # the hash alone puts all six in train
    splits = []
    for name in ("first", "second"):
        batch = client.post("/api/v1/batches", json={"name": f"held-out {name}"}, headers=auth).json()
        body = "\n".join(json.dumps({"text": f"{name} prompt {i}", "source_user_id": users[i % 6]}) for i in range(24))
        headers = auth | {"content-type": "application/x-ndjson"}
        response = client.post(f"/api/v1/batches/{batch['id']}/prompts", content=body, headers=headers)
        assert response.status_code == 201
        assert response.json()["hygiene"]["splits"] == {"train": 16, "valid": 4, "test": 4}
        stored = db.execute(select(Prompt.source_user_id, Prompt.split).where(Prompt.batch_id == batch["id"])).all()
        splits.append(dict(stored))
    assert splits[0] == splits[1]  # no user straddles splits across batches


def test_the_demo_batch_has_valid_and_test_prompts(committed_session):
    from sqlalchemy import func, select

    from app.demo import ensure_demo_batch
    from app.models import Prompt

    ensure_demo_batch()
    counts = dict(committed_session.execute(select(Prompt.split, func.count()).group_by(Prompt.split)).all())
    # The evaluation form's default held-out split (test) has prompts to draw from, and so has valid.
    assert counts.get("valid", 0) > 0 and counts.get("test", 0) > 0 and counts["train"] > counts["test"]
