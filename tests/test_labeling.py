"""Labeling service, labeler API and labeling pages: leasing, skipping, idempotent submits, dense ranks, access."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.collection.batches import create_tasks
from app.labeling import leases, submissions
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
    TaskItem,
    utcnow,
)
from app.security import create_api_token
from app.templating import render_guidelines
from tests.factories import AdminFactory, UserFactory


def seed_batch(
    db,
    *,
    n_prompts: int = 2,
    k: int = 4,
    overlap: int = 1,
    priority: int = 0,
    rankings: bool = True,
    demonstrations: bool = False,
    prompt_texts: list[str] | None = None,
    output_texts: list[str] | None = None,
    guidelines: str = "Rank by **correctness**.",
) -> PromptBatch:
    """Creates a batch in `labeling` with prompts, K model outputs each and its tasks; the browser tests use it too."""
    tag = uuid.uuid4().hex[:8]
    model = ModelVersion(name=f"base-{tag}", kind="base", status="ready", artifact_path="/nonexistent")
    batch = PromptBatch(
        name=f"batch-{tag}",
        status="labeling",
        k=k,
        overlap=overlap,
        priority=priority,
        wants_rankings=rankings,
        wants_demonstrations=demonstrations,
        guidelines=guidelines,
    )
    db.add_all([model, batch])
    db.flush()
    for i in range(n_prompts):
        text = prompt_texts[i] if prompt_texts else f"Prompt {i} of {batch.name}: what is {i} + 1?"
        prompt = Prompt(batch_id=batch.id, text=text, normalized_key=hashlib.sha256(f"{tag}:{i}".encode()).hexdigest())
        db.add(prompt)
        db.flush()
        if rankings:
            db.add_all(
                Completion(
                    prompt_id=prompt.id,
                    model_version_id=model.id,
                    text=output_texts[j] if output_texts else f"Output {j} for prompt {i}",
                )
                for j in range(k)
            )
    db.flush()
    create_tasks(db, batch)
    return batch


def tasks_of(db, batch: PromptBatch, kind: str = "ranking") -> list[Task]:
    return list(db.scalars(select(Task).where(Task.batch_id == batch.id, Task.kind == kind).order_by(Task.id)))


def items_for(assignment: Assignment, slots: list[int] | None = None, likert: int = 4) -> list[dict]:
    order = assignment.display_order
    slots = slots or list(range(1, len(order) + 1))
    return [
        {"completion_id": cid, "rank": slot, "likert": likert, "flags": []}
        for cid, slot in zip(order, slots, strict=True)
    ]


def expire(db, assignment: Assignment) -> None:
    assignment.expires_at = utcnow() - timedelta(minutes=1)
    db.flush()


# --- leasing ------------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_lease_order_is_priority_then_age(db):
    low = seed_batch(db, n_prompts=2, priority=0)
    high = seed_batch(db, n_prompts=2, priority=5)
    labeler = UserFactory()
    expected = [t.id for t in tasks_of(db, high)] + [t.id for t in tasks_of(db, low)]
    got = []
    for _ in expected:
        assignment = leases.lease_next_task(db, labeler, "ranking")
        got.append(assignment.task_id)
        submissions.submit_ranking(db, labeler, assignment.id, items_for(assignment))
    assert got == expected
    assert leases.lease_next_task(db, labeler, "ranking") is None


@pytest.mark.sqlite
def test_a_slot_is_never_leased_twice(db):
    batch = seed_batch(db, n_prompts=2, overlap=1)
    first, second = tasks_of(db, batch)
    a, b, c = UserFactory(), UserFactory(), UserFactory()
    lease_a = leases.lease_next_task(db, a)
    assert lease_a.task_id == first.id
    assert leases.lease_next_task(db, b).task_id == second.id
    assert leases.lease_next_task(db, c) is None
    # Asking again hands back the lease already held, not a second task.
    assert leases.lease_next_task(db, a).id == lease_a.id


def test_overlap_gives_each_task_to_that_many_distinct_labelers(db):
    batch = seed_batch(db, n_prompts=2, overlap=2)
    first, second = tasks_of(db, batch)
    got = [leases.lease_next_task(db, UserFactory()) for _ in range(5)]
    assert [a.task_id if a else None for a in got] == [first.id, first.id, second.id, second.id, None]


def test_expired_lease_returns_the_slot_to_the_pool(db):
    batch = seed_batch(db, n_prompts=1)
    (task,) = tasks_of(db, batch)
    a, b = UserFactory(), UserFactory()
    lease = leases.lease_next_task(db, a)
    assert leases.lease_next_task(db, b) is None
    expire(db, lease)
    assert leases.lease_next_task(db, b).task_id == task.id
    assert leases.expire_leases(db) == 1
    assert db.get(Assignment, lease.id).state == "expired"


def test_display_order_is_a_recorded_shuffle_per_labeler(db):
    batch = seed_batch(db, n_prompts=1, k=9, overlap=4)
    (task,) = tasks_of(db, batch)
    items = sorted(db.scalars(select(TaskItem.completion_id).where(TaskItem.task_id == task.id)))
    orders = [leases.lease_next_task(db, UserFactory()).display_order for _ in range(4)]
    assert all(sorted(order) == items for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # four equal shuffles of 9: odds 1 in 10^16


def test_bad_kind_is_refused(db):
    with pytest.raises(leases.LabelingError) as err:
        leases.lease_next_task(db, UserFactory(), "poetry")
    assert err.value.field == "kind"


# --- skipping -----------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_skipped_task_is_never_offered_to_that_labeler_again(db):
    batch = seed_batch(db, n_prompts=1)
    a, b = UserFactory(), UserFactory()
    lease = leases.lease_next_task(db, a)
    submissions.skip(db, a, lease.id, "unclear", "the question is cut off")
    assert leases.lease_next_task(db, a) is None
    expire(db, lease)  # a skip is final even once the lease time has passed
    assert leases.lease_next_task(db, a) is None
    assert leases.lease_next_task(db, b).task_id == tasks_of(db, batch)[0].id
    stored = db.get(Assignment, lease.id)
    assert (stored.state, stored.skip_reason, stored.skip_note) == ("skipped", "unclear", "the question is cut off")


def test_skip_needs_a_known_reason_and_a_note_for_other(db):
    seed_batch(db, n_prompts=1)
    a = UserFactory()
    lease = leases.lease_next_task(db, a)
    with pytest.raises(leases.LabelingError) as err:
        submissions.skip(db, a, lease.id, "bored")
    assert err.value.field == "reason"
    with pytest.raises(leases.LabelingError) as err:
        submissions.skip(db, a, lease.id, "other", "   ")
    assert err.value.field == "note"
    with pytest.raises(leases.LabelingError) as err:
        submissions.submit_ranking(db, a, submissions.skip(db, a, lease.id, "other", "no time").id, items_for(lease))
    assert err.value.status == 409


# --- submitting ---------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_submit_is_idempotent(db):
    batch = seed_batch(db, n_prompts=1, demonstrations=True)
    a = UserFactory()
    lease = leases.lease_next_task(db, a, "ranking")
    first = submissions.submit_ranking(db, a, lease.id, items_for(lease))
    again = submissions.submit_ranking(db, a, lease.id, items_for(lease, likert=7))
    assert again.id == first.id
    assert db.scalar(select(func.count()).select_from(Ranking)) == 1
    assert db.scalar(select(func.count()).select_from(RankingItem)) == 4
    task = db.get(Task, lease.task_id)
    db.refresh(task)
    assert (task.done_count, task.is_open) == (1, False)

    demo_lease = leases.lease_next_task(db, a, "demonstration")
    demo = submissions.submit_demonstration(db, a, demo_lease.id, "  The answer is 1.\n")
    assert submissions.submit_demonstration(db, a, demo_lease.id, "something else").id == demo.id
    assert (
        db.scalar(select(Demonstration.text).where(Demonstration.assignment_id == demo_lease.id))
        == "  The answer is 1."
    )
    assert db.scalar(select(func.count()).select_from(Demonstration)) == 1
    assert tasks_of(db, batch, "demonstration")[0].done_count == 1


def test_expired_lease_submit_is_accepted_when_the_slot_is_free(db):
    seed_batch(db, n_prompts=1)
    a = UserFactory()
    lease = leases.lease_next_task(db, a)
    expire(db, lease)
    leases.expire_leases(db)
    ranking = submissions.submit_ranking(db, a, lease.id, items_for(lease), active_seconds=42)
    assert ranking.active_seconds == 42
    assert db.get(Assignment, lease.id).state == "submitted"


def test_expired_lease_submit_is_409_when_someone_else_took_the_slot(db):
    seed_batch(db, n_prompts=1)
    a, b = UserFactory(), UserFactory()
    lease_a = leases.lease_next_task(db, a)
    expire(db, lease_a)
    lease_b = leases.lease_next_task(db, b)
    with pytest.raises(leases.LabelingError) as err:
        submissions.submit_ranking(db, a, lease_a.id, items_for(lease_a))
    assert err.value.status == 409 and "another labeler" in str(err.value)
    with pytest.raises(leases.LabelingError) as err:
        submissions.save_draft(db, a, lease_a.id, {"slots": {}})
    assert err.value.status == 409
    assert submissions.submit_ranking(db, b, lease_b.id, items_for(lease_b)).labeler_id == b.id


def test_ties_are_stored_as_dense_ranks_with_display_positions(db):
    seed_batch(db, n_prompts=1, k=5)
    a = UserFactory()
    lease = leases.lease_next_task(db, a)
    ranking = submissions.submit_ranking(db, a, lease.id, items_for(lease, slots=[1, 3, 3, 5, 5]))
    rows = db.execute(
        select(RankingItem.completion_id, RankingItem.rank, RankingItem.position)
        .where(RankingItem.ranking_id == ranking.id)
        .order_by(RankingItem.position)
    ).all()
    assert [(cid, rank, pos) for cid, rank, pos in rows] == list(
        zip(lease.display_order, [1, 2, 2, 3, 3], range(5), strict=True)
    )


def test_draft_is_saved_and_renews_the_lease(db):
    seed_batch(db, n_prompts=1)
    a = UserFactory()
    lease = leases.lease_next_task(db, a)
    expire(db, lease)
    submissions.save_draft(db, a, lease.id, {"slots": {"1": 2}}, active_seconds=12)
    stored = db.get(Assignment, lease.id)
    assert stored.draft == {"slots": {"1": 2}} and stored.active_seconds == 12 and stored.state == "leased"
    assert stored.expires_at > utcnow() + timedelta(minutes=10)


# --- the JSON API -------------------------------------------------------------------------------


def test_api_flow_next_draft_submit_repeat_and_204(client, login, db):
    seed_batch(db, n_prompts=1, k=4)
    user = UserFactory()
    csrf = login(user.username)
    headers = {"X-CSRF-Token": csrf}
    task = client.get("/api/v1/tasks/next", params={"kind": "ranking"}).json()
    assert task["kind"] == "ranking" and len(task["completions"]) == 4
    assert "fails_instruction" in task["flags"] and "other" in task["skip_reasons"]
    url = f"/api/v1/assignments/{task['assignment_id']}"
    assert client.put(url + "/draft", json={"draft": {"likert": {"1": 3}}}, headers=headers).status_code == 200
    assert client.get(url).json()["draft"] == {"likert": {"1": 3}}
    ids = [c["id"] for c in task["completions"]]
    body = {
        "items": [
            {"completion_id": cid, "rank": slot, "likert": 5} for cid, slot in zip(ids, [1, 2, 2, 4], strict=True)
        ],
        "active_seconds": 30,
    }
    first = client.post(url + "/submit", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert [item["rank"] for item in first.json()["items"]] == [1, 2, 2, 3]
    again = client.post(url + "/submit", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert client.get("/api/v1/tasks/next", params={"kind": "ranking"}).status_code == 204


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda items: items[2].update(likert=9), "items[2].likert"),
        (lambda items: items[1].update(rank=0), "items[1].rank"),
        (lambda items: items[3].update(flags=["boring"]), "items[3].flags"),
        (lambda items: items[0].update(completion_id=10**9), "items[0].completion_id"),
        (lambda items: items[1].update(completion_id=items[0]["completion_id"]), "items[1].completion_id"),
        (lambda items: items.pop(), "items:"),
    ],
)
def test_validation_messages_name_the_item_and_field(client, db, change, field):
    seed_batch(db, n_prompts=1, k=4)
    raw, _ = create_api_token(db, UserFactory(), ["label"])
    headers = {"Authorization": f"Bearer {raw}"}
    task = client.get("/api/v1/tasks/next", headers=headers).json()
    items = [{"completion_id": c["id"], "rank": 1, "likert": 4} for c in task["completions"]]
    change(items)
    response = client.post(
        f"/api/v1/assignments/{task['assignment_id']}/submit", json={"items": items}, headers=headers
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith(field)
    assert db.scalar(select(func.count()).select_from(Ranking)) == 0


def test_another_labelers_assignment_is_404(client, login, db):
    seed_batch(db, n_prompts=1)
    owner = UserFactory()
    lease = leases.lease_next_task(db, owner)
    raw, _ = create_api_token(db, UserFactory(), ["label"])
    bearer = {"Authorization": f"Bearer {raw}"}
    url = f"/api/v1/assignments/{lease.id}"
    assert client.get(url, headers=bearer).status_code == 404
    assert client.put(url + "/draft", json={"draft": {}}, headers=bearer).status_code == 404
    assert client.post(url + "/submit", json={"items": items_for(lease)}, headers=bearer).status_code == 404
    assert client.post(url + "/skip", json={"reason": "unclear"}, headers=bearer).status_code == 404
    login(UserFactory().username)
    assert client.get(f"/label/assignments/{lease.id}", headers={"accept": "text/html"}).status_code == 404
    assert db.get(Assignment, lease.id).state == "leased"


def test_labeler_api_needs_a_login_or_a_label_token(client, db):
    assert client.get("/api/v1/tasks/next").status_code == 401
    raw, _ = create_api_token(db, AdminFactory(), ["admin", "export:read"])
    response = client.get("/api/v1/tasks/next", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 403 and "label" in response.json()["detail"]


def test_cookie_writes_need_the_csrf_header(client, login, db):
    seed_batch(db, n_prompts=1)
    login(UserFactory().username)
    task = client.get("/api/v1/tasks/next").json()
    url = f"/api/v1/assignments/{task['assignment_id']}/draft"
    assert client.put(url, json={"draft": {"x": 1}}).status_code == 403
    assert client.put(url, json={"draft": {"x": 1}}, headers={"X-CSRF-Token": "wrong"}).status_code == 403


# --- the pages ----------------------------------------------------------------------------------


def test_next_page_leases_and_redirects_then_says_when_nothing_is_left(client, login, db):
    seed_batch(db, n_prompts=1, prompt_texts=["Say <b>hi</b> & bye"], output_texts=["<i>a</i>", "b", "c", "d"])
    csrf = login(UserFactory().username)
    response = client.get("/label/next?kind=ranking", follow_redirects=False)
    assert response.status_code == 303
    location = response.headers["location"]
    assignment_id = int(re.fullmatch(r"/label/assignments/(\d+)", location).group(1))
    page = client.get(location)
    assert page.status_code == 200 and 'data-testid="ranking-page"' in page.text
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in page.text and "&lt;i&gt;a&lt;/i&gt;" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.text.count('data-testid="output-card"') == 4 and 'data-testid="slot-4"' in page.text
    # Every script is a file (the CSP forbids inline code); the page data is inert JSON.
    for tag in re.findall(r"<script[^>]*>", page.text):
        assert "src=" in tag or 'type="application/json"' in tag
    assert not re.search(r"\sstyle=|\son[a-z]+=", page.text)

    # The ids the page shows for this assignment (not completion ids: app.labeling.blind).
    shown = [int(cid) for cid in dict.fromkeys(re.findall(r'data-completion-id="(\d+)"', page.text))]
    assert len(shown) == 4 and not set(shown) & set(db.get(Assignment, assignment_id).display_order)
    items = [{"completion_id": cid, "rank": 1, "likert": 4} for cid in shown]
    assert (
        client.post(
            f"/api/v1/assignments/{assignment_id}/submit", json={"items": items}, headers={"X-CSRF-Token": csrf}
        ).status_code
        == 200
    )
    done = client.get("/label/next?kind=ranking")
    assert done.status_code == 200 and 'data-testid="nothing-left"' in done.text
    # Back on a submitted task shows it read-only (issue 20), never another task in its place.
    back = client.get(location, follow_redirects=False)
    assert back.status_code == 200 and 'data-testid="submitted-page"' in back.text
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in back.text and back.headers["cache-control"] == "no-store"
    assert 'data-testid="submit"' not in back.text and 'href="/label/next?kind=ranking"' in back.text


def test_demonstration_page_shows_the_draft_and_guidelines(client, login, db):
    seed_batch(db, n_prompts=1, rankings=False, demonstrations=True, guidelines="Be **kind**.\n\n- short\n- true")
    user = UserFactory()
    lease = leases.lease_next_task(db, user, "demonstration")
    submissions.save_draft(db, user, lease.id, {"text": "half </textarea><script>x</script> done"})
    login(user.username)
    page = client.get(f"/label/assignments/{lease.id}")
    assert 'data-testid="demonstration-page"' in page.text
    assert "half &lt;/textarea&gt;&lt;script&gt;x&lt;/script&gt; done</textarea>" in page.text
    assert "Be <strong>kind</strong>.</p>" in page.text and "<li>short</li>\n<li>true</li>" in page.text


def test_next_without_a_kind_offers_rankings_then_demonstrations(client, login, db):
    seed_batch(db, n_prompts=1, demonstrations=True)
    csrf = login(UserFactory().username)
    assert 'data-testid="ranking-page"' in client.get("/label/next").text
    ranking_url = client.get("/label/next", follow_redirects=False).headers["location"]  # the lease held
    skip = client.post(
        "/api/v1" + ranking_url.removeprefix("/label") + "/skip",
        json={"reason": "language"},
        headers={"X-CSRF-Token": csrf},
    )
    assert skip.json()["state"] == "skipped"
    assert 'data-testid="demonstration-page"' in client.get("/label/next").text
    # Back on the skipped task: it says so, read-only, with the reason; not the demonstration in its place.
    back = client.get(ranking_url, follow_redirects=False)
    assert back.status_code == 200 and "You skipped this task" in back.text
    assert "It is in a language I do not read" in back.text and 'data-testid="demonstration-page"' not in back.text
    # A confirmation names only the user's own submitted assignment; anything else is ignored.
    assert 'data-testid="just-submitted"' not in client.get("/label/next?submitted=999999").text


def test_labeling_pages_are_for_labelers_only(client, login, db):
    assert client.get("/label/next", follow_redirects=False).headers["location"].startswith("/login")
    login(AdminFactory().username)
    assert client.get("/label/next", headers={"accept": "text/html"}).status_code == 403


def test_guidelines_are_escaped_before_the_small_markdown_subset():
    html = str(
        render_guidelines(
            "# Rules\n**Be kind** and *brief*, use `code`.\n\n- one\n- <script>alert(1)</script>\n\n"
            "<img src=x onerror=alert(2)> 2 * 3 * 4"
        )
    )
    assert "<h3>Rules</h3>" in html
    assert "<p><strong>Be kind</strong> and <em>brief</em>, use <code>code</code>.</p>" in html
    assert "<ul>\n<li>one</li>\n<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>\n</ul>" in html
    assert "<p>&lt;img src=x onerror=alert(2)&gt; 2 * 3 * 4</p>" in html
    assert "<script" not in html and "<img" not in html
