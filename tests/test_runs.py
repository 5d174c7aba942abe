"""Run bookkeeping: a cancelled run's late result is dropped; a cancelled sampling run pauses its batch."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from app import runs
from app.collection import batches
from app.models import PromptBatch, TrainingRun
from app.registry import versions as registry
from tests.factories import BatchFactory, ModelVersionFactory, PromptFactory

pytestmark = pytest.mark.sqlite


def test_finish_keeps_the_heartbeat_curve_and_only_for_the_holder(db):
    run = runs.start_run(db, "sft")
    assert runs.claim_run(db, run.id)
    assert runs.heartbeat(db, run.id, 0.5, "step 5/10", {"curve": [{"step": 5, "loss": 1.2}]})
    assert runs.finish_run(db, run.id, metrics={"valid_loss": 0.9})
    db.refresh(run)
    assert run.status == "succeeded" and run.metrics == {"valid_loss": 0.9, "curve": [{"step": 5, "loss": 1.2}]}
    assert not runs.finish_run(db, run.id, metrics={})  # no longer running: nothing to finish


def test_a_cancelled_run_is_not_overwritten_by_its_worker(db):
    from app.training.api import cancel_run
    from tests.factories import AdminFactory

    run = runs.start_run(db, "rm")
    assert runs.claim_run(db, run.id)
    assert runs.heartbeat(db, run.id, 0.4, "step 4/10")
    version = registry.register_version(
        db, kind="rm", name="rm-x", artifact_path="/x", status="training", training_run_id=run.id
    )
    admin = AdminFactory()
    cancel_run(db, run, admin.username)  # what the admin's cancel button does
    # The worker's late calls all find the run no longer theirs, and change nothing.
    assert not runs.heartbeat(db, run.id, 0.9, "step 9/10")
    assert not runs.finish_run(db, run.id, metrics={"valid_accuracy": 0.7}, output_version_id=version.id)
    runs.fail_run(db, run.id, "late failure")
    db.expire_all()
    run = db.get(TrainingRun, run.id)
    assert (run.status, run.message, run.progress) == ("cancelled", f"cancelled by {admin.username}", 0.4)
    assert run.error is None and run.output_version_id is None and run.metrics.get("valid_accuracy") is None
    assert db.get(type(version), version.id).status == "failed"  # its half-trained model is not usable


def test_mark_ready_promotes_only_the_first_of_a_kind(db):
    first = registry.register_version(db, kind="sft", name="sft-a", artifact_path="/a", status="training")
    second = registry.register_version(db, kind="sft", name="sft-b", artifact_path="/b", status="training")
    registry.mark_ready(db, first.id, {"valid_loss": 1.0})
    registry.mark_ready(db, second.id, {"valid_loss": 0.8})
    assert (first.status, second.status) == ("promoted", "ready")
    assert second.metrics == {"valid_loss": 0.8}


def test_cancelled_sampling_pauses_the_batch_and_resume_samples_again(db, client, login):
    from app.training.api import cancel_run
    from tests.factories import AdminFactory

    ModelVersionFactory(kind="base", status="promoted")
    batch = BatchFactory(wants_demonstrations=False)
    PromptFactory(batch=batch)
    batches.start_batch(db, batch)
    run = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch.id))
    cancel_run(db, run, AdminFactory().username)
    assert db.get(PromptBatch, batch.id).status == "paused"
    batches.transition(db, batch, "sampling")
    queued = db.scalars(
        select(TrainingRun).where(TrainingRun.batch_id == batch.id, TrainingRun.status == "queued")
    ).all()
    assert len(queued) == 1 and queued[0].triggered_by == "batch-resume"


def test_a_scheduled_run_that_failed_waits_out_the_backoff_instead_of_failing_at_every_check(db, monkeypatch):
    from datetime import timedelta

    from app.config import get_settings
    from app.labeling import leases, submissions
    from app.models import utcnow
    from app.training import data as training
    from tests.factories import UserFactory
    from tests.test_labeling import seed_batch

    monkeypatch.setenv("INSTRUCTLOOP_RETRAIN_MIN_NEW_DEMONSTRATIONS", "2")
    monkeypatch.setenv("INSTRUCTLOOP_RETRAIN_FAILURE_BACKOFF_S", "600")
    get_settings.cache_clear()
    try:
        seed_batch(db, n_prompts=2, rankings=False, demonstrations=True, overlap=1)
        labeler = UserFactory()
        for _ in range(2):
            assignment = leases.lease_next_task(db, labeler, "demonstration")
            submissions.submit_demonstration(db, labeler, assignment.id, "an answer")
        [first] = training.start_due_runs(db)
        assert runs.claim_run(db, first.id)
        runs.fail_run(db, first.id, "CUDA out of memory")
        assert training.due_kinds(db) == ["sft"]  # still due: nothing was trained
        assert training.start_due_runs(db) == []  # but not started again at once
        assert training.failed_recently(db, "sft").id == first.id
        # After the backoff the schedule tries once more.
        db.execute(
            update(TrainingRun).where(TrainingRun.id == first.id).values(finished_at=utcnow() - timedelta(seconds=601))
        )
        [second] = training.start_due_runs(db)
        assert second.kind == "sft" and second.id != first.id
        # A run an admin started and that failed does not hold the schedule back.
        assert runs.claim_run(db, second.id)
        db.get(TrainingRun, second.id).triggered_by = "admin"
        runs.fail_run(db, second.id, "bad params")
        assert [run.kind for run in training.start_due_runs(db)] == ["sft"]
    finally:
        get_settings.cache_clear()


def test_schedule_starts_the_chain_one_stage_at_a_time(db, monkeypatch):
    from app.config import get_settings
    from app.labeling import leases, submissions
    from app.training import data as training
    from tests.factories import UserFactory
    from tests.test_labeling import seed_batch

    monkeypatch.setenv("INSTRUCTLOOP_RETRAIN_MIN_NEW_DEMONSTRATIONS", "3")
    monkeypatch.setenv("INSTRUCTLOOP_RETRAIN_MIN_NEW_RANKINGS", "100")
    get_settings.cache_clear()
    try:
        seed_batch(db, n_prompts=3, rankings=False, demonstrations=True, overlap=2)
        labeler = UserFactory()
        assert training.due_kinds(db) == []
        for _ in range(3):
            assignment = leases.lease_next_task(db, labeler, "demonstration")
            submissions.submit_demonstration(db, labeler, assignment.id, "an answer")
        assert training.due_kinds(db) == ["sft"]
        started = training.start_due_runs(db)
        assert [run.kind for run in started] == ["sft"] and started[0].triggered_by == "schedule"
        assert training.start_due_runs(db) == []  # one stage at a time
        assert runs.claim_run(db, started[0].id)
        version = registry.register_version(
            db,
            kind="sft",
            name="sft-sched",
            artifact_path="/s",
            status="training",
            training_run_id=started[0].id,
            data_snapshot=training.demonstrations(db)[1].as_dict(),
        )
        registry.mark_ready(db, version.id)
        assert runs.finish_run(db, started[0].id, output_version_id=version.id)
        assert training.due_kinds(db) == []  # trained on everything; too few rankings for an RM
        assert training.start_due_runs(db) == []
        # One more demonstration is not enough for another SFT run; the third new one is.
        other = UserFactory()
        for n in range(3):
            assert training.due_kinds(db) == []
            assignment = leases.lease_next_task(db, other, "demonstration")
            submissions.submit_demonstration(db, other, assignment.id, f"another answer {n}")
        assert training.due_kinds(db) == ["sft"]
    finally:
        get_settings.cache_clear()
