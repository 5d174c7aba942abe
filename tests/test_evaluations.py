"""Blind human evaluation of model versions, and per-version behaviour from rankings.

The statistics are checked on hand-made verdicts with known answers; the flow
(start → sample → judge blind → complete → promotion gate) runs on PostgreSQL,
with sampling by a real Celery worker and the bundled tiny model in the slow test.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import select

from app.collection.sampling import store_samples
from app.config import get_settings
from app.labeling import leases, submissions
from app.models import Completion, EvalJudgment, Evaluation, ModelVersion, Prompt, PromptBatch, Task, TrainingRun
from app.quality import evaluations
from app.quality.behaviour import model_behaviour
from app.registry import versions as registry
from app.security import create_api_token
from tests.factories import AdminFactory, UserFactory
from tests.html_text import text, texts
from tests.test_labeling import seed_batch, tasks_of


def held_out_batch(db, n: int = 6, categories=("plain",), families=("arithmetic", "sorting")) -> PromptBatch:
    """A collection batch whose prompts are all in the test split, with a category and a world family each."""
    tag = uuid.uuid4().hex[:8]
    batch = PromptBatch(name=f"held-out-{tag}", status="completed")
    db.add(batch)
    db.flush()
    db.add_all(
        Prompt(
            batch_id=batch.id,
            text=f"Held-out prompt {i} ({tag})",
            split="test",
            category=categories[i % len(categories)],
            extra={"family": families[i % len(families)]},
            normalized_key=hashlib.sha256(f"{tag}:{i}".encode()).hexdigest(),
        )
        for i in range(n)
    )
    db.flush()
    return batch


def two_models(db, kind: str = "policy") -> tuple[ModelVersion, ModelVersion]:
    tag = uuid.uuid4().hex[:6]
    a = ModelVersion(name=f"cand-{tag}", kind=kind, status="ready", artifact_path="/nonexistent")
    b = ModelVersion(name=f"base-{tag}", kind=kind, status="ready", artifact_path="/nonexistent")
    db.add_all([a, b])
    db.flush()
    return a, b


def sample_by_hand(db, evaluation: Evaluation, identical: int = 0) -> int:
    """Stores one output per prompt for each model, as the worker would; the first `identical` prompts agree."""
    prompts = evaluations.prompts_needing_output(db, evaluation, evaluation.model_a_id)
    for model_id, word in ((evaluation.model_a_id, "alpha"), (evaluation.model_b_id, "beta")):
        store_samples(
            db,
            model_id,
            {
                pid: ["same answer" if i < identical else f"{word} answer to {pid}"]
                for i, (pid, _) in enumerate(prompts)
            },
            {"temperature": 0.0},
        )
    return evaluations.open_for_judging(db, evaluation)


def judge(db, labeler, prefer: str) -> EvalJudgment:
    """Leases the labeler's next eval task and gives the verdict `prefer` ('a', 'b' or 'tie')."""
    assignment = leases.lease_next_task(db, labeler, "eval")
    assert assignment is not None
    task = db.get(Task, assignment.task_id)
    evaluation = evaluations.for_batch(db, task.batch_id)
    if prefer == "tie":
        choice = "tie"
    else:
        wanted = evaluation.model_a_id if prefer == "a" else evaluation.model_b_id
        choice = db.scalar(
            select(Completion.id).where(
                Completion.id.in_(assignment.display_order), Completion.model_version_id == wanted
            )
        )
    return submissions.submit(db, labeler, assignment.id, choice=choice, active_seconds=12)


@pytest.fixture
def settings_env(monkeypatch):
    """Sets INSTRUCTLOOP_* variables for one test."""

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(f"INSTRUCTLOOP_{name.upper()}", str(value))
        get_settings.cache_clear()

    yield set_
    monkeypatch.undo()
    get_settings.cache_clear()


# --- the statistics on known answers -------------------------------------------------------------


def test_tally_win_rate_interval_and_tie_rate_on_known_counts():
    # 8 wins, 2 losses: 80 %, Wilson 95 % interval 49.0 %–94.3 % (Wilson 1927; Newcombe 1998, table I).
    found = evaluations.Tally(8, 2, 0).summary()
    assert found["win_rate"] == pytest.approx(0.8)
    assert found["low"] == pytest.approx(0.4902, abs=1e-4) and found["high"] == pytest.approx(0.9433, abs=1e-4)
    # Ties count half and show in the tie rate: 3 wins, 1 loss, 4 ties -> (3 + 2) / 8.
    found = evaluations.Tally(3, 1, 4).summary()
    assert found["win_rate"] == pytest.approx(0.625) and found["tie_rate"] == pytest.approx(0.5)
    # No verdicts: no rate and no interval.
    assert evaluations.Tally().summary()["win_rate"] is None


# --- starting an evaluation -------------------------------------------------------------------------


def test_start_copies_held_out_prompts_into_an_evaluation_batch_and_queues_sampling(db):
    source = held_out_batch(db, n=6)
    db.add(Prompt(batch_id=source.id, text="a training prompt", split="train", normalized_key="f" * 64))
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=4)
    batch = db.get(PromptBatch, evaluation.batch_id)
    assert (batch.purpose, batch.status, batch.name) == ("evaluation", "sampling", f"Evaluation {evaluation.id}")
    copied = db.scalars(select(Prompt).where(Prompt.batch_id == batch.id)).all()
    assert len(copied) == 4 and evaluation.n_prompts == 4
    assert all(p.split == "test" and p.text.startswith("Held-out") for p in copied)
    run = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch.id))
    assert (run.kind, run.params, run.triggered_by) == ("sample", {"evaluation_id": evaluation.id}, "evaluation")


@pytest.mark.parametrize(
    ("change", "field", "status"),
    [
        ({"model_b_id": "same"}, "model_b_id", 422),
        ({"kind_b": "rm"}, "model_b_id", 422),
        ({"status_a": "training"}, "model_a_id", 422),
        ({"prompt_split": "train"}, "prompt_split", 422),
        ({"n_prompts": 0}, "n_prompts", 422),
        ({"no_prompts": True}, "prompt_split", 409),
    ],
)
def test_start_refuses_with_a_message_naming_the_field(db, change, field, status):
    if not change.get("no_prompts"):
        held_out_batch(db)
    a, b = two_models(db)
    if "kind_b" in change:
        b.kind = change["kind_b"]
    if "status_a" in change:
        a.status = change["status_a"]
    kwargs = {"model_a_id": a.id, "model_b_id": a.id if change.get("model_b_id") == "same" else b.id}
    kwargs.update({k: v for k, v in change.items() if k in ("prompt_split", "n_prompts")})
    with pytest.raises(evaluations.EvaluationError) as exc:
        evaluations.start_evaluation(db, **kwargs)
    assert exc.value.field == field and exc.value.status == status


# --- judging -----------------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_blind_judging_to_completion_with_results_per_category_and_family(db):
    held_out_batch(db, n=6, categories=("plain", "few-shot"), families=("arithmetic", "sorting", "facts"))
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=6, overlap=2)
    assert sample_by_hand(db, evaluation, identical=1) == 5
    assert evaluation.status == "labeling" and evaluation.n_identical == 1
    first, second = UserFactory(), UserFactory()
    for verdict in ["a", "a", "a", "b", "tie"]:
        judge(db, first, verdict)
    for verdict in ["a", "b", "a", "a", "a"]:
        judge(db, second, verdict)
    db.refresh(evaluation)
    assert evaluation.status == "completed" and evaluation.completed_at is not None
    assert db.get(PromptBatch, evaluation.batch_id).status == "completed"
    result = evaluations.results(db, evaluation)
    assert (result.overall["wins"], result.overall["losses"], result.overall["ties"]) == (7, 2, 1)
    assert result.overall["win_rate"] == pytest.approx(0.75)
    assert result.overall["low"] < 0.75 < result.overall["high"]
    assert result.tasks == 5 and result.tasks_done == 10 and result.labelers == 2
    assert sum(t["n"] for t in result.by_category.values()) == 10
    assert set(result.by_family) <= {"arithmetic", "sorting", "facts"}
    assert sum(t["n"] for t in result.by_family.values()) == 10
    # Seen from B's side on B's own page, the same verdicts are a 25 % win rate.
    (for_b,) = evaluations.for_model(db, b.id)
    assert for_b["result"]["win_rate"] == pytest.approx(0.25) and for_b["opponent"]["id"] == a.id


def test_a_verdict_is_idempotent_and_a_bad_choice_names_the_field(db):
    held_out_batch(db, n=2)
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=2)
    sample_by_hand(db, evaluation)
    labeler = UserFactory()
    assignment = leases.lease_next_task(db, labeler, "eval")
    with pytest.raises(leases.LabelingError) as exc:
        submissions.submit(db, labeler, assignment.id, choice=123456789)
    assert exc.value.field == "choice"
    first = submissions.submit(db, labeler, assignment.id, choice=assignment.display_order[1])
    again = submissions.submit(db, labeler, assignment.id, choice="tie")
    assert again.id == first.id and again.winner == first.winner != "tie"
    assert db.get(Task, assignment.task_id).done_count == 1
    # The order each labeler saw is recorded: the judgment knows which model was shown first.
    shown_first = db.get(Completion, assignment.display_order[0]).model_version_id
    assert first.shown_first == ("a" if shown_first == a.id else "b")


def test_the_api_serves_eval_tasks_blind_and_takes_a_choice(client, db):
    held_out_batch(db, n=1)
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=1)
    sample_by_hand(db, evaluation)
    token, _ = create_api_token(db, UserFactory(), ["label"])
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}
    task = client.get("/api/v1/tasks/next?kind=eval", headers=auth).json()
    assert task["kind"] == "eval" and len(task["completions"]) == 2
    assert a.name not in str(task) and b.name not in str(task)  # blind
    url = f"/api/v1/assignments/{task['assignment_id']}/submit"
    bad = client.post(url, headers=auth, json={"choice": "left"})
    assert bad.status_code == 422
    done = client.post(url, headers=auth, json={"choice": task["completions"][0]["id"]})
    assert done.status_code == 200 and done.json()["choice"] == task["completions"][0]["id"]
    assert "winner" not in done.json()
    assert client.get("/api/v1/tasks/next?kind=eval", headers=auth).status_code == 204


def test_admin_api_starts_lists_and_cancels_evaluations(client, db):
    held_out_batch(db, n=3)
    a, b = two_models(db)
    token, _ = create_api_token(db, AdminFactory(), ["admin"])
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}
    refused = client.post("/api/v1/evaluations", headers=auth, json={"model_a_id": a.id, "model_b_id": a.id})
    assert refused.status_code == 422 and "model_b_id" in refused.json()["detail"]
    created = client.post(
        "/api/v1/evaluations", headers=auth, json={"model_a_id": a.id, "model_b_id": b.id, "n_prompts": 2}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "sampling" and body["model_a"]["name"] == a.name and body["overall"]["n"] == 0
    listed = client.get(f"/api/v1/evaluations?model_version_id={b.id}", headers=auth).json()
    assert [e["id"] for e in listed] == [body["id"]]
    cancelled = client.post(f"/api/v1/evaluations/{body['id']}/cancel", headers=auth)
    assert cancelled.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/evaluations/{body['id']}/cancel", headers=auth).status_code == 409
    db.expire_all()
    run = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == body["batch_id"]))
    assert run.status == "cancelled"
    # Evaluation batches stay out of the collection batch list.
    batches = client.get("/api/v1/batches", headers=auth).json()
    assert body["batch_id"] not in [batch["id"] for batch in batches]


# --- the loop: evaluation after PPO and the promotion gate ----------------------------------------------


def test_a_new_policy_is_evaluated_against_the_promoted_one(db, settings_env):
    settings_env(eval_after_ppo_prompts=3)
    held_out_batch(db, n=5)
    current = ModelVersion(
        name=f"policy-old-{uuid.uuid4().hex[:6]}", kind="policy", status="training", artifact_path="/x"
    )
    db.add(current)
    db.flush()
    registry.mark_ready(db, current.id)  # the first policy is promoted, nothing to compare with
    assert current.status == "promoted"
    assert db.scalar(select(Evaluation)) is None
    new = ModelVersion(name=f"policy-new-{uuid.uuid4().hex[:6]}", kind="policy", status="training", artifact_path="/y")
    db.add(new)
    db.flush()
    registry.mark_ready(db, new.id)
    evaluation = db.scalar(select(Evaluation))
    assert (evaluation.model_a_id, evaluation.model_b_id, evaluation.n_prompts) == (new.id, current.id, 3)
    assert evaluation.triggered_by == "schedule" and new.status == "ready"


@pytest.mark.sqlite
def test_the_promotion_gate_needs_a_won_evaluation_and_a_scheduled_win_promotes(db, settings_env):
    settings_env(promotion_requires_eval_win="true", eval_after_ppo_prompts=2)
    held_out_batch(db, n=4)
    current, new = two_models(db)
    registry.promote(db, current)
    with pytest.raises(registry.RegistryError, match="has not won"):
        registry.promote(db, new)
    evaluation = evaluations.start_evaluation(
        db, model_a_id=new.id, model_b_id=current.id, n_prompts=2, triggered_by="schedule"
    )
    sample_by_hand(db, evaluation)
    labeler = UserFactory()
    judge(db, labeler, "a")
    judge(db, labeler, "tie")
    db.refresh(new)
    assert evaluations.has_won(db, new.id, current.id)
    assert new.status == "promoted"  # the scheduled evaluation was won: promoted on completion
    # A rollback goes back without a new evaluation.
    assert registry.rollback(db, "policy").id == current.id


def test_a_lost_evaluation_keeps_the_gate_shut(db, settings_env):
    settings_env(promotion_requires_eval_win="true")
    held_out_batch(db, n=2)
    current, new = two_models(db)
    registry.promote(db, current)
    evaluation = evaluations.start_evaluation(db, model_a_id=new.id, model_b_id=current.id, n_prompts=2)
    sample_by_hand(db, evaluation)
    labeler = UserFactory()
    judge(db, labeler, "b")
    judge(db, labeler, "tie")
    assert not evaluations.has_won(db, new.id, current.id)
    with pytest.raises(registry.RegistryError):
        registry.promote(db, new)


# --- behaviour of model versions ---------------------------------------------------------------------------


def test_flag_rates_and_mean_likert_per_model_version(db):
    batch = seed_batch(db, n_prompts=2, k=4)
    model_id = db.scalar(select(Completion.model_version_id).join(Prompt).where(Prompt.batch_id == batch.id))
    labeler = UserFactory()
    for _task in tasks_of(db, batch):
        assignment = leases.lease_next_task(db, labeler, "ranking")
        order = assignment.display_order
        items = [
            {
                "completion_id": cid,
                "rank": i + 1,
                "likert": [2, 4, 6, 4][i],
                "flags": ["hallucination"] if i == 0 else (["harmful_advice", "hallucination"] if i == 1 else []),
            }
            for i, cid in enumerate(order)
        ]
        submissions.submit_ranking(db, labeler, assignment.id, items)
    found = model_behaviour(db, model_id)
    assert found.n_outputs == 8 and found.n_rankings == 2
    assert found.likert.value == pytest.approx(4.0)
    assert found.likert.low < 4.0 < found.likert.high
    assert found.flags["hallucination"].value == pytest.approx(0.5)
    assert found.flags["harmful_advice"].value == pytest.approx(0.25)
    assert found.flags["sexual_content"].value == 0.0 and found.flags["sexual_content"].high > 0
    assert found.as_dict()["flags"]["hallucination"]["n"] == 8
    empty = model_behaviour(db, 987654)
    assert empty.n_outputs == 0 and empty.likert.value is None


def test_model_page_shows_evaluations_and_behaviour(client, db, login):
    held_out_batch(db, n=2)
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=2)
    sample_by_hand(db, evaluation)
    labeler = UserFactory()
    judge(db, labeler, "a")
    judge(db, labeler, "a")
    admin = AdminFactory()
    db.commit()
    login(admin.username)
    page = client.get(f"/admin/models/{a.id}")
    assert page.status_code == 200 and 'data-testid="model-eval-chart"' in page.text
    row = f"model-eval-row-{evaluation.id}"
    assert text(page.text, "model-eval-win-rate", within=row) == "100.0 %"
    other = client.get(f"/admin/models/{b.id}")
    assert text(other.text, "model-eval-win-rate", within=row) == "0.0 %"  # the same verdicts from B's side
    detail = client.get(f"/admin/evaluations/{evaluation.id}")
    assert detail.status_code == 200 and 'data-testid="evaluation-chart"' in detail.text
    assert text(detail.text, "win-rate") == "100.0 %" and text(detail.text, "verdicts") == "2 / 2"
    listing = client.get("/admin/evaluations")
    assert listing.status_code == 200
    assert f"{a.name} {b.name} completed 2 / 2 100.0 %" in text(listing.text, f"evaluation-row-{evaluation.id}")


# --- the API's and the pages' other routes -------------------------------------------------------------------


def test_the_api_shows_one_evaluation_with_its_results(client, db):
    held_out_batch(db, n=4, categories=("plain", "few-shot"), families=("arithmetic", "sorting"))
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(
        db, model_a_id=a.id, model_b_id=b.id, n_prompts=4, overlap=2, temperature=0.5, max_new_tokens=20
    )
    assert sample_by_hand(db, evaluation, identical=1) == 3
    labeler, second = UserFactory(), UserFactory()
    for who, verdicts in ((labeler, "aab"), (second, "a-a")):
        for verdict in verdicts:
            judge(db, who, "tie" if verdict == "-" else verdict)
    token, _ = create_api_token(db, AdminFactory(), ["admin"])
    labeler_token, _ = create_api_token(db, labeler, ["label"])
    db.commit()
    url = f"/api/v1/evaluations/{evaluation.id}"
    response = client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    body = response.json()
    assert {
        k: body[k]
        for k in (
            "id",
            "status",
            "batch_id",
            "n_prompts",
            "overlap",
            "prompt_split",
            "temperature",
            "max_new_tokens",
            "triggered_by",
            "n_identical",
            "tasks",
            "tasks_done",
            "labelers",
        )
    } == {
        "id": evaluation.id,
        "status": "completed",
        "batch_id": evaluation.batch_id,
        "n_prompts": 4,
        "overlap": 2,
        "prompt_split": "test",
        "temperature": 0.5,
        "max_new_tokens": 20,
        "triggered_by": "admin",
        "n_identical": 1,
        "tasks": 3,
        "tasks_done": 6,
        "labelers": 2,
    }
    assert body["model_a"] == {"id": a.id, "name": a.name, "kind": "policy"}
    assert body["model_b"] == {"id": b.id, "name": b.name, "kind": "policy"}
    overall = body["overall"]
    assert (overall["wins"], overall["losses"], overall["ties"], overall["n"]) == (4, 1, 1, 6)
    assert overall["win_rate"] == pytest.approx(0.75) and overall["tie_rate"] == pytest.approx(1 / 6)
    assert overall["low"] < 0.75 < overall["high"]
    assert body["completed_at"] is not None
    assert sum(t["n"] for t in body["by_category"].values()) == 6 and set(body["by_category"]) <= {"plain", "few-shot"}
    assert sum(t["n"] for t in body["by_family"].values()) == 6
    # Unknown ids are a 404 naming the id; labelers may not read evaluations.
    missing = client.get(f"/api/v1/evaluations/{evaluation.id + 1000}", headers={"Authorization": f"Bearer {token}"})
    assert missing.status_code == 404 and str(evaluation.id + 1000) in missing.json()["detail"]
    assert client.get(url, headers={"Authorization": f"Bearer {labeler_token}"}).status_code == 403


def test_admin_starts_and_cancels_an_evaluation_through_the_form(client, db, login):
    source = held_out_batch(db, n=3)
    a, b = two_models(db)
    admin = AdminFactory()
    db.commit()
    csrf = login(admin.username)
    form = {
        "csrf_token": csrf,
        "model_a_id": str(a.id),
        "model_b_id": str(b.id),
        "n_prompts": "2",
        "overlap": "2",
        "prompt_split": "test",
        "temperature": "0",
        "max_new_tokens": "32",
        "source_batch_id": str(source.id),
    }
    assert client.post("/admin/evaluations", data={**form, "csrf_token": "wrong"}).status_code == 403
    # A refusal shows the form again with a message naming the field, and starts nothing.
    same = client.post("/admin/evaluations", data={**form, "model_b_id": str(a.id)})
    assert same.status_code == 422 and "model_b_id" in text(same.text, "page-error")
    too_many = client.post("/admin/evaluations", data={**form, "n_prompts": "0"})
    assert too_many.status_code == 422 and text(too_many.text, "page-error").startswith("n_prompts")
    assert db.scalar(select(Evaluation)) is None

    started = client.post("/admin/evaluations", data=form, follow_redirects=False)
    assert started.status_code == 303
    evaluation = db.scalar(select(Evaluation))
    assert started.headers["location"] == f"/admin/evaluations/{evaluation.id}"
    assert (
        evaluation.model_a_id,
        evaluation.model_b_id,
        evaluation.n_prompts,
        evaluation.overlap,
        evaluation.max_new_tokens,
        evaluation.created_by_id,
    ) == (a.id, b.id, 2, 2, 32, admin.id)
    copied = db.scalars(select(Prompt.text).where(Prompt.batch_id == evaluation.batch_id)).all()
    source_texts = set(db.scalars(select(Prompt.text).where(Prompt.batch_id == source.id)))
    assert len(copied) == 2 and set(copied) <= source_texts
    run = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == evaluation.batch_id))
    assert (run.kind, run.status) == ("sample", "queued")
    page = client.get(started.headers["location"])
    assert text(page.text, "evaluation-status") == "sampling" and texts(page.text, "cancel-evaluation") == ["Cancel"]

    assert client.post(f"/admin/evaluations/{evaluation.id}/cancel").status_code == 403  # no CSRF token
    cancelled = client.post(
        f"/admin/evaluations/{evaluation.id}/cancel", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert cancelled.status_code == 303 and cancelled.headers["location"] == f"/admin/evaluations/{evaluation.id}"
    db.expire_all()
    assert db.get(Evaluation, evaluation.id).status == "cancelled"
    assert db.get(PromptBatch, evaluation.batch_id).status == "archived"
    assert db.get(TrainingRun, run.id).status == "cancelled"
    page = client.get(cancelled.headers["location"])
    assert text(page.text, "evaluation-status") == "cancelled" and texts(page.text, "cancel-evaluation") == []
    again = client.post(f"/admin/evaluations/{evaluation.id}/cancel", data={"csrf_token": csrf})
    assert again.status_code == 409 and "already cancelled" in again.text
    unknown = client.post(f"/admin/evaluations/{evaluation.id + 1000}/cancel", data={"csrf_token": csrf})
    assert unknown.status_code == 404


def test_the_behaviour_api_reports_flag_rates_and_likert_of_hand_made_rankings(client, db):
    batch = seed_batch(db, n_prompts=3, k=4)
    model_id = db.scalar(select(Completion.model_version_id).join(Prompt).where(Prompt.batch_id == batch.id))
    labeler = UserFactory()
    for n, _task in enumerate(tasks_of(db, batch)):
        assignment = leases.lease_next_task(db, labeler, "ranking")
        items = [
            {
                "completion_id": cid,
                "rank": i + 1,
                "likert": [7, 5, 3, 1][i],
                "flags": ["hallucination"] if i < 2 else (["personal_data"] if i == 3 and n == 0 else []),
            }
            for i, cid in enumerate(assignment.display_order)
        ]
        submissions.submit_ranking(db, labeler, assignment.id, items, all_unacceptable=n == 1)
    token, _ = create_api_token(db, AdminFactory(), ["admin"])
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}
    response = client.get(f"/api/v1/models/{model_id}/behaviour", headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert (body["model_version_id"], body["n_outputs"], body["n_rankings"]) == (model_id, 12, 3)
    assert body["likert"]["value"] == pytest.approx(4.0) and body["likert"]["n"] == 12
    assert body["likert"]["low"] < 4.0 < body["likert"]["high"]
    assert body["flags"]["hallucination"]["value"] == pytest.approx(0.5)  # 6 of 12 outputs
    assert body["flags"]["personal_data"]["value"] == pytest.approx(1 / 12)
    assert body["flags"]["violent_content"]["value"] == 0.0 and body["flags"]["violent_content"]["high"] > 0
    assert body["all_unacceptable"]["value"] == pytest.approx(1 / 3) and body["all_unacceptable"]["n"] == 3
    missing = client.get(f"/api/v1/models/{model_id + 1000}/behaviour", headers=auth)
    assert missing.status_code == 404
