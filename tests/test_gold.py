"""Gold tasks: known answers mixed into the queue, scored per labeler, hidden from labelers, kept out of training."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from app.labeling import leases, submissions
from app.models import Assignment, GoldAnswer, Ranking, Task
from app.quality import gold
from app.security import create_api_token
from app.training import data as training
from tests.factories import AdminFactory, UserFactory
from tests.html_text import text, texts
from tests.test_labeling import seed_batch, tasks_of
from tests.test_quality import rank, task_outputs


@pytest.fixture
def seeded_draw():
    """Makes the gold draw reproducible for the test and restores it afterwards."""
    state = leases.gold_draw.getstate()
    leases.gold_draw.seed(1234)
    yield leases.gold_draw
    leases.gold_draw.setstate(state)


def by_output(db, task: Task, ranks: list[int]) -> dict[int, int]:
    return dict(zip(task_outputs(db, task), ranks, strict=True))


# --- scoring against a known answer ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([1, 2, 3, 4], (6, 6)),  # the same order: every pair agrees
        ([4, 3, 2, 1], (0, 6)),  # reversed: every pair disagrees
        ([1, 1, 2, 3], (5, 5)),  # the labeler's tie on the first two outputs leaves that pair out
        ([2, 1, 3, 4], (5, 6)),  # one swapped neighbour pair
        ([1, 1, 1, 1], (0, 0)),  # all tied: nothing to score
    ],
)
def test_a_check_is_scored_by_pairs_ordered_like_the_answer(given, expected):
    answer = {10: 1, 11: 2, 12: 3, 13: 4}
    assert gold.score_check(answer, dict(zip([10, 11, 12, 13], given, strict=True))) == expected


def test_the_answer_own_ties_leave_pairs_out():
    answer = {1: 1, 2: 1, 3: 2}  # outputs 1 and 2 are equally good
    assert gold.score_check(answer, {1: 1, 2: 2, 3: 3}) == (2, 2)
    assert gold.score_check(answer, {1: 3, 2: 2, 3: 1}) == (0, 2)


def test_a_check_of_other_outputs_scores_nothing():
    assert gold.score_check({1: 1, 2: 2}, {1: 1, 3: 2}) == (0.0, 0)


# --- marking gold ----------------------------------------------------------------------------------------


def test_marking_a_ranking_gold_closes_its_task_to_the_normal_queue(db):
    batch = seed_batch(db, n_prompts=2, k=4)
    expert, labeler = UserFactory(), UserFactory()
    first, second = tasks_of(db, batch)
    answer = rank(db, expert, first, [1, 2, 3, 4])
    found = gold.mark_ranking_gold(db, answer.id, AdminFactory(), batch.id)

    assert found.task_id == first.id and found.source == "ranking" and found.source_ranking_id == answer.id
    assert found.ranks == {str(c): r for c, r in by_output(db, first, [1, 2, 3, 4]).items()}
    db.refresh(first)
    assert first.is_gold and not first.is_open
    # With no gold share the labeler only ever gets the ordinary task.
    assert leases.lease_next_task(db, labeler, "ranking").task_id == second.id


def test_a_gold_check_cannot_be_an_answer_key_nor_can_a_ranking_that_ties_everything(db):
    batch = seed_batch(db, n_prompts=2, k=4)
    first, _ = tasks_of(db, batch)
    flat = rank(db, UserFactory(), first, [1, 1, 1, 1])
    with pytest.raises(gold.GoldError, match="ties every output"):
        gold.mark_ranking_gold(db, flat.id, None, batch.id)
    with pytest.raises(gold.GoldError, match="no ranking") as exc:
        gold.mark_ranking_gold(db, flat.id, None, batch.id + 1000)
    assert exc.value.status == 404


@pytest.mark.sqlite
def test_consensus_gold_needs_enough_rankings_and_takes_their_borda_order(db):
    batch = seed_batch(db, n_prompts=1, k=4, overlap=3)
    (task,) = tasks_of(db, batch)
    rank(db, UserFactory(), task, [1, 2, 3, 4])
    rank(db, UserFactory(), task, [2, 1, 3, 4])
    with pytest.raises(gold.GoldError, match="needs at least 3") as exc:
        gold.mark_consensus_gold(db, task.id, None, batch.id)
    assert exc.value.status == 409
    rank(db, UserFactory(), task, [1, 3, 2, 4])
    answer = gold.mark_consensus_gold(db, task.id, None, batch.id)
    assert answer.source == "consensus"
    # Borda points (4 - rank, summed): output 0 -> 3+2+3 = 8, 1 -> 2+3+1 = 6, 2 -> 1+1+2 = 4, 3 -> 0.
    assert answer.ranks == {str(c): r for c, r in by_output(db, task, [1, 2, 3, 4]).items()}


def test_unmarking_returns_the_task_to_the_queue_when_it_still_needs_labels(db):
    batch = seed_batch(db, n_prompts=1, k=4, overlap=2)
    (task,) = tasks_of(db, batch)
    answer = rank(db, UserFactory(), task, [1, 2, 3, 4])
    gold.mark_ranking_gold(db, answer.id, None, batch.id)
    gold.unmark_gold(db, task.id, batch.id)
    db.refresh(task)
    assert not task.is_gold and task.is_open
    assert db.scalar(select(func.count()).select_from(GoldAnswer)) == 0
    with pytest.raises(gold.GoldError):
        gold.unmark_gold(db, task.id, batch.id)


# --- gold in the queue -------------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_with_a_full_gold_share_a_labeler_gets_each_gold_task_once_then_ordinary_work(db, seeded_draw):
    batch = seed_batch(db, n_prompts=4, k=4)
    tasks = tasks_of(db, batch)
    for task in tasks[:2]:
        gold.mark_ranking_gold(db, rank(db, UserFactory(), task, [1, 2, 3, 4]).id, None, batch.id)
    batch.gold_share = 1.0
    labeler = UserFactory()
    served = []
    for _ in range(4):
        assignment = leases.lease_next_task(db, labeler, "ranking")
        if assignment is None:
            break
        served.append(assignment.task_id)
        # The labeler's answer to a gold task: the known order reversed for one, kept for the other.
        slots = [4, 3, 2, 1] if assignment.task_id == tasks[0].id else [1, 2, 3, 4]
        outputs = task_outputs(db, db.get(Task, assignment.task_id))
        submissions.submit_ranking(
            db,
            labeler,
            assignment.id,
            [{"completion_id": c, "rank": s, "likert": 4, "flags": []} for c, s in zip(outputs, slots, strict=True)],
        )
    assert set(served[:2]) == {tasks[0].id, tasks[1].id}  # gold first, each once
    assert set(served[2:]) == {tasks[2].id, tasks[3].id}  # then the ordinary tasks
    # Checks are marked, do not count towards the gold tasks' overlap, and are scored.
    checks = db.scalars(select(Ranking).where(Ranking.labeler_id == labeler.id, Ranking.is_gold)).all()
    assert len(checks) == 2
    for task in tasks[:2]:
        db.refresh(task)
        assert task.done_count == 1  # only the expert's answer
    _, labelers = gold.gold_report(db, batch.id)
    (row,) = [r for r in labelers if r.labeler_id == labeler.id]
    assert (row.n_checks, row.agreeing_pairs, row.counted_pairs) == (2, 6, 12)
    assert row.accuracy.value == pytest.approx(0.5)
    assert sorted(row.per_check) == [0.0, 1.0]


def test_gold_share_sets_the_share_of_leases_that_are_checks(db, seeded_draw):
    batch = seed_batch(db, n_prompts=200, k=4)
    batch.gold_share = 0.25
    tasks = tasks_of(db, batch)
    gold.mark_ranking_gold(db, rank(db, UserFactory(), tasks[0], [1, 2, 3, 4]).id, None, batch.id)
    gold_leases = 0
    for _ in range(160):  # each new labeler can be served the one gold task once
        assignment = leases.lease_next_task(db, UserFactory(), "ranking")
        gold_leases += assignment.task_id == tasks[0].id
    # Binomial(160, 0.25): mean 40, sd 5.5; the seeded draw makes this exact, the bounds say what is meant.
    assert 24 <= gold_leases <= 56


def test_no_gold_share_means_no_checks(db, seeded_draw):
    batch = seed_batch(db, n_prompts=30, k=4)
    tasks = tasks_of(db, batch)
    gold.mark_ranking_gold(db, rank(db, UserFactory(), tasks[0], [1, 2, 3, 4]).id, None, batch.id)
    for _ in range(20):
        assert leases.lease_next_task(db, UserFactory(), "ranking").task_id != tasks[0].id


def test_gold_checks_are_left_out_of_reward_model_training(db, seeded_draw):
    batch = seed_batch(db, n_prompts=2, k=4)
    batch.gold_share = 1.0
    first, _ = tasks_of(db, batch)
    answer = rank(db, UserFactory(), first, [1, 2, 3, 4])
    gold.mark_ranking_gold(db, answer.id, None, batch.id)
    rank(db, UserFactory(), first, [2, 1, 3, 4])  # a gold check (the lease draws gold)
    data, _snapshot = training.rankings(db)
    ids = [row.ranking_id for split in data.values() for row in split]
    assert answer.id in ids and len(ids) == 1


# --- the API and the page ------------------------------------------------------------------------------------


def test_a_gold_task_looks_like_any_other_task_through_the_api(client, db, seeded_draw):
    batch = seed_batch(db, n_prompts=3, k=4, prompt_texts=["Sort 3 1 2.", "Reverse abc.", "Count the vowels."])
    batch.gold_share = 1.0
    first, *_ = tasks_of(db, batch)
    gold.mark_ranking_gold(db, rank(db, UserFactory(), first, [1, 2, 3, 4]).id, None, batch.id)
    token, _ = create_api_token(db, UserFactory(), ["label"])
    db.commit()
    response = client.get("/api/v1/tasks/next?kind=ranking", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    body = response.json()
    assert db.get(Assignment, body["assignment_id"]).task_id == first.id and body["batch_id"] == batch.id
    assert "task_id" not in body and "prompt_id" not in body  # ids that would single the check out
    assert "gold" not in json.dumps(body).lower()
    submitted = client.post(
        f"/api/v1/assignments/{body['assignment_id']}/submit",
        headers={"Authorization": f"Bearer {token}"},
        json={
            "items": [{"completion_id": c["id"], "rank": i + 1, "likert": 5} for i, c in enumerate(body["completions"])]
        },
    )
    assert submitted.status_code == 200 and "gold" not in submitted.text.lower()


def test_admin_marks_and_reads_gold_through_the_api(client, db):
    batch = seed_batch(db, n_prompts=2, k=4)
    first, second = tasks_of(db, batch)
    answer = rank(db, UserFactory(), first, [1, 2, 3, 4])
    token, _ = create_api_token(db, AdminFactory(), ["admin"])
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}
    url = f"/api/v1/batches/{batch.id}/gold"

    both = client.post(url, headers=auth, json={"ranking_id": answer.id, "task_id": second.id})
    assert both.status_code == 422 and "either ranking_id" in both.text
    few = client.post(url, headers=auth, json={"task_id": second.id})
    assert few.status_code == 409 and "task_id" in few.json()["detail"]
    assert client.post(url, headers=auth, json={"ranking_id": answer.id}).status_code == 201
    report = client.get(url, headers=auth).json()
    assert [t["task_id"] for t in report["tasks"]] == [first.id]
    assert report["tasks"][0]["source"] == "ranking"
    assert client.delete(f"{url}/{first.id}", headers=auth).json() == {"task_id": first.id, "is_gold": False}
    assert client.delete(f"{url}/{first.id}", headers=auth).status_code == 404


def test_gold_page_shows_labelers_accuracy_as_a_chart(client, db, login, seeded_draw):
    batch = seed_batch(db, n_prompts=3, k=4)
    batch.gold_share = 1.0
    first, *_ = tasks_of(db, batch)
    gold.mark_ranking_gold(db, rank(db, UserFactory(), first, [1, 2, 3, 4]).id, None, batch.id)
    checker = UserFactory(username="checker")
    rank(db, checker, first, [1, 2, 4, 3])  # 5 of 6 pairs right
    admin = AdminFactory()
    db.commit()
    csrf = login(admin.username)
    page = client.get(f"/admin/batches/{batch.id}/gold")
    assert page.status_code == 200
    assert 'data-testid="gold-chart"' in page.text
    assert text(page.text, "gold-accuracy", within="gold-labeler-checker") == "83.3 %"  # 5 of 6 pairs
    labelers = client.get("/admin/labelers")
    assert text(labelers.text, "gold-accuracy", within="labeler-checker").startswith("83.3 % (")
    dashboard = client.get("/admin/quality")  # every batch at once: agreement, gold and win-rate charts
    assert dashboard.status_code == 200 and 'data-testid="gold-chart"' in dashboard.text
    assert "checker" in dashboard.text and "83.3 %" in text(dashboard.text, "gold-chart")
    # Marking by form (with CSRF) and a refusal that names the field.
    bad = client.post(f"/admin/batches/{batch.id}/gold", data={"csrf_token": csrf, "ranking_id": "999999"})
    assert bad.status_code == 404 and "ranking_id" in text(bad.text, "page-error")


def test_admin_marks_and_unmarks_gold_through_the_page_forms(client, db, login):
    batch = seed_batch(db, n_prompts=2, k=4, overlap=3)
    second, first = tasks_of(db, batch)  # `second` gets the consensus of three, `first` one trusted ranking
    for ranks in ([1, 2, 3, 4], [2, 1, 3, 4], [1, 3, 2, 4]):
        rank(db, UserFactory(), second, ranks)
    answer = rank(db, UserFactory(), first, [1, 2, 3, 4])
    admin = AdminFactory()
    db.commit()
    csrf = login(admin.username)
    url = f"/admin/batches/{batch.id}/gold"
    assert texts(client.get(url).text, "gold-tasks") == []  # none yet
    assert client.post(url, data={"ranking_id": str(answer.id)}).status_code == 403  # no CSRF token

    marked = client.post(url, data={"csrf_token": csrf, "ranking_id": str(answer.id)}, follow_redirects=False)
    assert marked.status_code == 303 and marked.headers["location"] == url
    consensus = client.post(url, data={"csrf_token": csrf, "task_id": str(second.id)}, follow_redirects=False)
    assert consensus.status_code == 303
    db.expire_all()
    answers = {a.task_id: a for a in db.scalars(select(GoldAnswer))}
    assert set(answers) == {first.id, second.id}
    assert (answers[first.id].source, answers[first.id].source_ranking_id) == ("ranking", answer.id)
    assert answers[first.id].created_by_id == admin.id
    assert answers[first.id].ranks == {str(c): r for c, r in by_output(db, first, [1, 2, 3, 4]).items()}
    assert answers[second.id].source == "consensus"
    assert db.get(Task, first.id).is_gold and not db.get(Task, first.id).is_open
    page = client.get(url).text
    assert f"ranking {answer.id}" in text(page, f"gold-task-{first.id}")
    assert "consensus" in text(page, f"gold-task-{second.id}")
    # Marking the same answer twice, or both fields at once, is refused with the field named.
    both = client.post(url, data={"csrf_token": csrf, "ranking_id": str(answer.id), "task_id": str(second.id)})
    assert both.status_code == 422 and "ranking_id" in text(both.text, "page-error")

    removed = client.post(f"{url}/{first.id}/remove", data={"csrf_token": csrf}, follow_redirects=False)
    assert removed.status_code == 303 and removed.headers["location"] == url
    db.expire_all()
    task = db.get(Task, first.id)
    assert not task.is_gold and task.is_open  # it still wants two more labels
    assert set(db.scalars(select(GoldAnswer.task_id))) == {second.id}
    page = client.get(url).text
    assert texts(page, f"gold-task-{first.id}") == [] and len(texts(page, f"gold-task-{second.id}")) == 1
    again = client.post(f"{url}/{first.id}/remove", data={"csrf_token": csrf})
    assert again.status_code == 404 and text(again.text, "page-error")
    assert client.post(f"{url}/{second.id}/remove", data={}).status_code == 403  # no CSRF token
