"""The admin's batch pages: create, upload (errors by line, then the hygiene report), start, dashboards.

One test drives them in Chromium.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.models import Assignment, Prompt, PromptBatch, Task, TrainingRun, User, utcnow
from app.security import hash_password
from tests.factories import PASSWORD, AdminFactory, ModelVersionFactory, PromptFactory, UserFactory

BAD_FILE = (
    '{"text": "What is 2 + 2?", "source_user_id": "u1"}\n'
    '{"text": "Explain gravity", "category": "essay"}\n'
    '{"text": ""}\n'
    '{"text": "broken\n'
)
GOOD_FILE = (
    '{"text": "What is 2 + 2?", "source_user_id": "u1"}\n'
    '{"text": "Explain gravity", "category": "plain"}\n'
    '{"text": "what is 2 + 2?"}\n'
    '{"text": "Mail alice@example.org for details"}\n'
)


@pytest.fixture
def admin_csrf(db, login):
    admin = AdminFactory()
    return login(admin.username)


def _create(client, csrf, **fields):
    form = {
        "csrf_token": csrf,
        "name": "Batch A",
        "guidelines": "Be kind",
        "task_mix": "both",
        "k": "5",
        "overlap": "1",
        "temperature": "0.7",
        "top_p": "0.9",
        "max_new_tokens": "32",
        "priority": "0",
        "pii_policy": "drop",
        "policy_version_id": "",
        **fields,
    }
    return client.post("/admin/batches/new", data=form, follow_redirects=False)


def test_pages_need_an_admin(client, db, login):
    assert client.get("/admin/batches", follow_redirects=False).status_code == 303
    labeler = UserFactory()
    login(labeler.username)
    assert client.get("/admin/batches").status_code == 403


def test_create_form_creates_and_redirects(client, db, admin_csrf):
    page = client.get("/admin/batches/new")
    assert page.status_code == 200 and 'name="csrf_token"' in page.text
    response = _create(client, admin_csrf)
    assert response.status_code == 303
    batch = db.scalar(select(PromptBatch).where(PromptBatch.name == "Batch A"))
    assert response.headers["location"] == f"/admin/batches/{batch.id}"
    assert (batch.k, batch.temperature, batch.max_new_tokens, batch.wants_rankings) == (5, 0.7, 32, True)
    assert "Batch A" in client.get("/admin/batches").text

    duplicate = _create(client, admin_csrf)
    assert duplicate.status_code == 409 and "already exists" in duplicate.text
    bad_k = _create(client, admin_csrf, name="Batch B", k="12")
    assert bad_k.status_code == 422 and "K outputs to rank must be at most 9." in bad_k.text
    assert 'value="Batch B"' in bad_k.text
    assert _create(client, "wrong", name="Batch C").status_code == 403


def test_upload_lists_errors_then_imports_and_shows_report(client, db, admin_csrf):
    batch_id = int(_create(client, admin_csrf).headers["location"].rsplit("/", 1)[1])
    url = f"/admin/batches/{batch_id}/prompts"
    bad = client.post(
        url,
        data={"csrf_token": admin_csrf},
        files={"file": ("prompts.jsonl", BAD_FILE.encode(), "application/octet-stream")},
    )
    assert bad.status_code == 422
    rows = re.findall(r'<tr data-testid="upload-error"><td>(\d+)</td><td>([^<]*)</td>', bad.text)
    assert rows == [("2", "category"), ("3", "text"), ("4", "—")]
    assert db.get(PromptBatch, batch_id).hygiene_report == {}

    good = client.post(
        url,
        data={"csrf_token": admin_csrf},
        files={"file": ("prompts.jsonl", GOOD_FILE.encode(), "application/octet-stream")},
        follow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"] == f"/admin/batches/{batch_id}?imported=2"
    page = client.get(good.headers["location"])
    assert 'data-testid="hygiene-report"' in page.text
    assert re.search(r'data-testid="rule-duplicates"><td>[^<]*</td><td>1</td>', page.text)
    assert re.search(r'data-testid="rule-pii_dropped"><td>[^<]*</td><td>1</td>', page.text)
    assert f"/api/v1/batches/{batch_id}/hygiene/dropped.csv" in page.text
    csv_text = client.get(f"/api/v1/batches/{batch_id}/hygiene/dropped.csv").text
    assert csv_text.splitlines()[1:] == ["3,duplicate,same text as line 1", "4,pii,contains email"]

    binary = client.post(
        url,
        data={"csrf_token": admin_csrf},
        files={"file": ("book.xlsx", b"PK\x03\x04zip", "application/octet-stream")},
    )
    assert binary.status_code == 415 and "binary" in binary.text
    empty = client.post(url, data={"csrf_token": admin_csrf})
    assert empty.status_code == 422 and "choose a JSON Lines or CSV file" in empty.text


def test_start_button_and_status_actions(client, db, admin_csrf):
    batch_id = int(_create(client, admin_csrf).headers["location"].rsplit("/", 1)[1])
    refused = client.post(f"/admin/batches/{batch_id}/start", data={"csrf_token": admin_csrf})
    assert refused.status_code == 409 and "import prompts before starting" in refused.text
    ModelVersionFactory()
    client.post(
        f"/admin/batches/{batch_id}/prompts",
        data={"csrf_token": admin_csrf},
        files={"file": ("p.csv", b"text\nHello\nGoodbye\n", "text/csv")},
    )
    started = client.post(f"/admin/batches/{batch_id}/start", data={"csrf_token": admin_csrf}, follow_redirects=False)
    assert started.status_code == 303
    assert db.get(PromptBatch, batch_id).status == "sampling"
    assert db.scalar(select(TrainingRun.kind).where(TrainingRun.batch_id == batch_id)) == "sample"
    page = client.get(f"/admin/batches/{batch_id}")
    assert 'data-testid="upload-form"' not in page.text and 'value="paused"' in page.text
    frozen = client.post(
        f"/admin/batches/{batch_id}/settings",
        data={"csrf_token": admin_csrf, "name": "Batch A", "guidelines": "Clearer", "k": "6"},
    )
    assert frozen.status_code == 409 and "can only change while the batch is a draft" in frozen.text
    saved = client.post(
        f"/admin/batches/{batch_id}/settings",
        data={"csrf_token": admin_csrf, "name": "Batch A", "guidelines": "Clearer", "priority": "3"},
        follow_redirects=False,
    )
    assert saved.status_code == 303 and db.get(PromptBatch, batch_id).priority == 3
    assert (
        client.post(
            f"/admin/batches/{batch_id}/status",
            data={"csrf_token": admin_csrf, "status": "paused"},
            follow_redirects=False,
        ).status_code
        == 303
    )
    assert db.get(PromptBatch, batch_id).status == "paused"
    wrong = client.post(f"/admin/batches/{batch_id}/status", data={"csrf_token": admin_csrf, "status": "archived"})
    assert wrong.status_code == 409 and "cannot go from paused to archived" in wrong.text


def test_dashboard_shows_throughput_skips_and_eta(client, db, admin_csrf):
    batch = PromptBatch(name="Busy", k=4, status="labeling")
    db.add(batch)
    db.flush()
    ann, bob = UserFactory(username="ann"), UserFactory(username="bob")
    now = utcnow()
    for i in range(6):
        prompt = PromptFactory(batch_id=batch.id)
        task = Task(
            batch_id=batch.id, prompt_id=prompt.id, kind="demonstration", needed=2, done_count=1 if i < 4 else 0
        )
        db.add(task)
        db.flush()
        who, state = (ann, "submitted") if i < 3 else (bob, "submitted" if i < 4 else "skipped")
        db.add(
            Assignment(
                task_id=task.id,
                labeler_id=who.id,
                state=state,
                leased_at=now - timedelta(hours=2),
                expires_at=now,
                finished_at=now - timedelta(minutes=60 - i),
                active_seconds=[20, 40, 50, 400, 0, 0][i],
                skip_reason="unclear" if state == "skipped" else None,
            )
        )
    db.flush()
    page = client.get(f"/admin/batches/{batch.id}")
    assert page.status_code == 200
    assert "<polyline" in page.text and "Histogram of active time per task" in page.text
    assert re.search(r"<td>ann</td><td>3</td><td>0</td>\s*<td>40 s</td>", page.text)
    assert re.search(r"<td>bob</td><td>1</td><td>2</td>", page.text)
    assert "<td>unclear</td><td>2</td>" in page.text
    listing = client.get("/admin/batches").text
    # 8 labels still needed, 4 submitted in the last 24 h: 48 hours to go.
    assert "4 / 12" in listing and "48.0 h" in listing


@pytest.mark.slow
@pytest.mark.browser
def test_admin_fixes_a_bad_file_in_chromium(live_server, committed_session, page, tmp_path):
    admin = User(username="chrome-admin", role="admin", password_hash=hash_password(PASSWORD))
    committed_session.add(admin)
    committed_session.commit()
    page.goto(f"{live_server}/login?next=/admin/batches")
    page.fill("input[name=username]", "chrome-admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin/batches")
    page.click("[data-testid=new-batch]")
    page.fill("[data-testid=field-name]", "Chromium batch")
    page.fill("[data-testid=field-guidelines]", "Rank by correctness.")
    page.click("[data-testid=create-batch]")
    page.wait_for_url(re.compile(r".*/admin/batches/\d+$"))

    bad, good = tmp_path / "prompts.jsonl", tmp_path / "prompts-fixed.jsonl"
    bad.write_text(BAD_FILE)
    good.write_text(GOOD_FILE)
    page.set_input_files("[data-testid=upload-file]", str(bad))
    page.click("[data-testid=upload-submit]")
    errors = page.locator("[data-testid=upload-error]")
    assert errors.count() == 3
    assert [errors.nth(i).locator("td").first.inner_text() for i in range(3)] == ["2", "3", "4"]
    assert errors.nth(0).locator("td").nth(1).inner_text() == "category"

    page.set_input_files("[data-testid=upload-file]", str(good))
    page.click("[data-testid=upload-submit]")
    page.wait_for_selector("[data-testid=hygiene-report]")
    assert page.locator("[data-testid=imported]").inner_text() == "Imported 2 prompts."
    assert page.locator("[data-testid=hygiene-kept]").inner_text() == "2"
    assert page.locator("[data-testid=rule-duplicates] td").nth(1).inner_text() == "1"
    assert page.locator("[data-testid=upload-error]").count() == 0
    stored = committed_session.scalars(select(Prompt.text).order_by(Prompt.source_line)).all()
    assert stored == ["What is 2 + 2?", "Explain gravity"]


# -- a second import, the allowed categories, the hygiene report (issue 20) ------------------------------------


def _upload(client, csrf, batch_id, body: str, **form):
    return client.post(
        f"/admin/batches/{batch_id}/prompts",
        data={"csrf_token": csrf, **form},
        files={"file": ("prompts.jsonl", body.encode(), "application/octet-stream")},
        follow_redirects=False,
    )


def _lines(*texts: str) -> str:
    return "\n".join(json.dumps({"text": t}) for t in texts)


def test_a_second_import_appends_and_replacing_says_what_it_removed(client, db, admin_csrf):
    batch_id = int(_create(client, admin_csrf).headers["location"].rsplit("/", 1)[1])
    first = _upload(client, admin_csrf, batch_id, _lines("one", "two", "three"))
    assert first.status_code == 303
    page = client.get(first.headers["location"]).text
    assert "Imported 3 prompts." in page
    # The replace box is never ticked for the admin, even once the batch has prompts.
    box = re.search(r'<input type="checkbox" name="replace"[^>]*>', page).group(0)
    assert "checked" not in box and 'data-confirm="' in box

    second = _upload(client, admin_csrf, batch_id, _lines("four", "five"))
    assert second.status_code == 303
    count = db.query(Prompt).filter(Prompt.batch_id == batch_id).count()
    assert count == 5
    assert (
        "Imported 2 prompts, added to the 3 already in the batch (5 in all)."
        in client.get(second.headers["location"]).text
    )

    replaced = _upload(client, admin_csrf, batch_id, _lines("six"), replace="on")
    assert replaced.status_code == 303
    assert db.query(Prompt).filter(Prompt.batch_id == batch_id).count() == 1
    assert "Removed the 5 prompts the batch had and imported 1 prompt." in client.get(replaced.headers["location"]).text


def test_the_import_form_lists_the_categories_and_the_report_ends_in_words(client, db, admin_csrf):
    batch_id = int(_create(client, admin_csrf).headers["location"].rsplit("/", 1)[1])
    page = client.get(f"/admin/batches/{batch_id}").text
    assert re.search(r"categor[^<]*plain, few-shot, user-based", page)
    bad = _upload(client, admin_csrf, batch_id, '{"text": "What is 2 + 2?", "category": "arithmetic"}')
    assert bad.status_code == 422
    assert "unknown category &#39;arithmetic&#39; (allowed: plain, few-shot, user-based)" in bad.text
    good = _upload(client, admin_csrf, batch_id, _lines("What is 2 + 2?", "Name a colour"))
    report = client.get(good.headers["location"]).text
    splits = re.search(r"Splits:(.*?)</p>", report, re.S).group(1)
    assert "PII found: none" in splits and not re.search(r"PII found:\s*$", splits)


@pytest.mark.slow
@pytest.mark.browser
def test_replacing_prompts_asks_first_in_chromium(live_server, committed_session, page, tmp_path):
    admin = User(username="chrome-replacer", role="admin", password_hash=hash_password(PASSWORD))
    batch = PromptBatch(name="Replace me")
    committed_session.add_all([admin, batch])
    committed_session.commit()
    page.goto(f"{live_server}/login?next=/admin/batches/{batch.id}")
    page.fill("input[name=username]", "chrome-replacer")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**/admin/batches/{batch.id}")
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(_lines("alpha prompt", "beta prompt"))
    second.write_text(_lines("gamma prompt"))
    page.set_input_files("[data-testid=upload-file]", str(first))
    page.click("[data-testid=upload-submit]")
    assert page.locator("[data-testid=imported]").inner_text() == "Imported 2 prompts."

    page.set_input_files("[data-testid=upload-file]", str(second))
    assert not page.locator("[data-testid=upload-replace]").is_checked()
    page.check("[data-testid=upload-replace]")
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("[data-testid=upload-submit]")
    assert asked == ["Replace: delete the batch's 2 prompts and import only this file?"]
    assert committed_session.scalar(select(func.count()).where(Prompt.batch_id == batch.id)) == 2

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-testid=upload-submit]")
    page.wait_for_selector("text=Removed the 2 prompts the batch had and imported 1 prompt.")
    assert committed_session.scalars(select(Prompt.text).where(Prompt.batch_id == batch.id)).all() == ["gamma prompt"]


# -- forms: defaults shown, every error at once in words, the input kept (issue 20) ----------------------------


def _value(html: str, name: str) -> str:
    return re.search(rf'<input name="{name}"[^>]*value="([^"]*)"', html).group(1)


def test_the_new_batch_form_shows_the_stored_defaults(client, db, admin_csrf):
    html = client.get("/admin/batches/new").text
    shown = {name: _value(html, name) for name in ("temperature", "top_p", "extra_overlap_fraction", "gold_share")}
    assert shown == {"temperature": "1.0", "top_p": "0.95", "extra_overlap_fraction": "0.0", "gold_share": "0.0"}
    assert (_value(html, "k"), _value(html, "overlap"), _value(html, "max_new_tokens")) == ("4", "1", "48")


def test_a_form_reports_every_error_at_once_in_words_and_keeps_the_input(client, db, admin_csrf):
    bad = _create(client, admin_csrf, name="Typo batch", k="12", temperature="11", top_p="abc", gold_share="2")
    assert bad.status_code == 422
    problems = re.findall(r'<li data-testid="form-problem"[^>]*>([^<]*)</li>', bad.text)
    assert problems == [
        "K outputs to rank must be at most 9.",
        "Temperature must be at most 10.",
        "top_p must be a number.",
        "Share of gold checks must be at most 1.",
    ]
    assert "Input should" not in bad.text and "k: " not in bad.text
    kept = {name: _value(bad.text, name) for name in ("name", "k", "temperature", "top_p", "gold_share")}
    assert kept == {"name": "Typo batch", "k": "12", "temperature": "11", "top_p": "abc", "gold_share": "2"}


def test_the_settings_form_keeps_the_typed_values_on_an_error(client, db, admin_csrf):
    batch_id = int(_create(client, admin_csrf).headers["location"].rsplit("/", 1)[1])
    bad = client.post(
        f"/admin/batches/{batch_id}/settings",
        data={"csrf_token": admin_csrf, "name": "Renamed", "guidelines": "Kept text", "priority": "5000", "k": "3"},
    )
    assert bad.status_code == 422
    problems = re.findall(r'<li data-testid="form-problem"[^>]*>([^<]*)</li>', bad.text)
    assert problems == ["K outputs to rank must be at least 4.", "Priority must be at most 1000."]
    assert (_value(bad.text, "name"), _value(bad.text, "priority"), _value(bad.text, "k")) == ("Renamed", "5000", "3")
    assert "Kept text</textarea>" in bad.text
    assert db.get(PromptBatch, batch_id).name == "Batch A"
