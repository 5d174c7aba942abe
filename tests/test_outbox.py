"""The job outbox: messages go out only after the transaction commits, never for rolled-back runs."""

from __future__ import annotations

import pytest

import app.outbox as jobs
from app.runs import RunError, start_run


@pytest.fixture
def sent(monkeypatch):
    calls: list[int] = []
    # Records instead of sending; the real send is exercised against Redis in test_jobs.py.
    monkeypatch.setattr(jobs, "_send", lambda run_id, kind: (calls.append(run_id), True)[1])
    return calls


def test_run_is_sent_after_commit_not_after_a_savepoint(committed_session, sent):
    db = committed_session
    run = start_run(db, "sample")  # start_run uses a savepoint internally
    assert sent == []
    db.commit()
    assert sent == [run.id]
    db.refresh(run)
    assert run.enqueued_at is not None


def test_rolled_back_run_is_never_sent(committed_session, sent):
    db = committed_session
    start_run(db, "pretrain")
    db.rollback()
    kept = start_run(db, "sample")
    db.commit()
    assert sent == [kept.id]


def test_second_active_training_run_of_a_kind_is_refused(committed_session, sent):
    db = committed_session
    start_run(db, "sft")
    with pytest.raises(RunError, match="already queued or running"):
        start_run(db, "sft")
    db.commit()
    assert len(sent) == 1


def test_unsent_runs_are_sent_by_the_dispatcher(committed_session, monkeypatch):
    db = committed_session
    monkeypatch.setattr(jobs, "_send", lambda run_id, kind: False)  # broker down
    run = start_run(db, "sample")
    db.commit()
    db.refresh(run)
    assert run.enqueued_at is None
    calls: list[int] = []
    monkeypatch.setattr(jobs, "_send", lambda run_id, kind: (calls.append(run_id), True)[1])
    assert jobs.send_pending_runs(db) == 1
    db.commit()
    assert calls == [run.id] and jobs.send_pending_runs(db) == 0
