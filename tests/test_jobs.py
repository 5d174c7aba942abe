"""Background jobs through a real Celery worker on Redis: sampling, crash recovery, broker outages."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.models import Completion, Prompt, PromptBatch, Task, TaskItem, TrainingRun
from tests.conftest import DATA_DIR, REDIS_URL, free_port, start_celery_worker, stop_process, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # real workers that train; the limit only catches a hang


@pytest.fixture(scope="module")
def tiny_model_path() -> Path:
    """A tiny causal LM saved where worker processes can load it (built, not downloaded)."""
    from app.world import corpus
    from worker.modeling import save_model, tiny_causal_lm
    from worker.world_model import train_tokenizer

    path = DATA_DIR / "tiny-model"
    if not (path / "config.json").exists():
        tokenizer = train_tokenizer(list(corpus(300, seed=1)), vocab_size=300)
        model = tiny_causal_lm(
            tokenizer,
            seed=0,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        save_model(model, tokenizer, path)
    return path


def _seed_batch(db, model_path: Path, n_prompts: int, k: int = 4, max_new_tokens: int = 12) -> int:
    from app.collection.batches import create_batch, start_batch
    from app.registry.versions import register_base_model
    from app.world import generate_prompts

    register_base_model(db, str(model_path))
    batch = create_batch(
        db,
        name=f"jobs-{time.monotonic_ns()}",
        k=k,
        wants_demonstrations=False,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
    )
    for i, p in enumerate(generate_prompts(n_prompts, seed=7)):
        db.add(Prompt(batch_id=batch.id, text=p.text, normalized_key=f"{i:064x}", split="train"))
    db.flush()
    start_batch(db, batch)
    db.commit()
    return batch.id


def _run_of(db, batch_id: int) -> TrainingRun:
    db.expire_all()
    return db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch_id))


def test_sampling_job_fills_a_batch_with_k_distinct_completions(committed_session, celery_worker, tiny_model_path):
    db = committed_session
    batch_id = _seed_batch(db, tiny_model_path, n_prompts=6, k=5)
    run = wait_until(
        lambda: (r := _run_of(db, batch_id)) and r.status in ("succeeded", "failed") and r,
        timeout=120,
        message="the sampling run to finish",
    )
    assert run.status == "succeeded", run.error
    assert run.attempts == 1 and run.progress == 1.0
    batch = db.get(PromptBatch, batch_id)
    assert batch.status == "labeling"
    per_prompt = db.execute(
        select(Completion.prompt_id, func.count(), func.count(func.distinct(Completion.text)))
        .join(Prompt, Prompt.id == Completion.prompt_id)
        .where(Prompt.batch_id == batch_id)
        .group_by(Completion.prompt_id)
    ).all()
    assert len(per_prompt) == 6
    assert all(n == 5 for _, n, _ in per_prompt)
    # The tiny random model rarely repeats itself; duplicates are resampled, so nearly all are distinct.
    assert sum(distinct for _, _, distinct in per_prompt) >= 28
    tasks = db.scalars(select(Task).where(Task.batch_id == batch_id)).all()
    assert len(tasks) == 6 and {t.kind for t in tasks} == {"ranking"} and {t.k for t in tasks} == {5}
    assert (
        db.scalar(select(func.count()).select_from(TaskItem).where(TaskItem.task_id.in_([t.id for t in tasks]))) == 30
    )


def test_a_duplicate_message_does_nothing_twice(committed_session, celery_worker, tiny_model_path):
    from app.outbox import sender

    db = committed_session
    batch_id = _seed_batch(db, tiny_model_path, n_prompts=2)
    run = wait_until(
        lambda: (r := _run_of(db, batch_id)) and r.status == "succeeded" and r, timeout=120, message="the sampling run"
    )
    message = sender().send_task("instructloop.sample_batch", args=[run.id])
    # Positive signal that the worker consumed the duplicate: its log line for that very message.
    log_path = celery_worker.log_path
    consumed = f"Task instructloop.sample_batch[{message.id}] succeeded"
    line = wait_until(
        lambda: next((line for line in log_path.read_text(errors="replace").splitlines() if consumed in line), None),
        timeout=120,
        message="the worker consuming the duplicate message",
    )
    assert line.endswith("'skipped'"), line
    run = _run_of(db, batch_id)
    assert run.attempts == 1 and run.status == "succeeded"
    assert db.scalar(select(func.count()).select_from(Task).where(Task.batch_id == batch_id)) == 2


def test_killed_worker_run_is_resumed_and_finished_exactly_once(
    committed_session, tiny_model_path, tmp_path, monkeypatch
):
    """SIGKILL mid-job; the reaper re-queues the run and a new worker finishes it once."""
    import redis

    from app.config import get_settings
    from app.outbox import send_pending_runs
    from app.runs import reap_stale_runs

    redis.Redis.from_url(REDIS_URL).flushdb()
    db = committed_session
    batch_id = _seed_batch(db, tiny_model_path, n_prompts=160, k=4, max_new_tokens=24)
    worker = start_celery_worker(log_path=tmp_path / "w1.log")
    try:
        wait_until(
            lambda: (r := _run_of(db, batch_id)) and r.status == "running" and r.progress > 0 and r,
            timeout=120,
            interval=0.1,
            message="the run to make progress",
        )
    finally:
        # The whole process group: the prefork parent and the child running the job.
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    run = _run_of(db, batch_id)
    assert run.status == "running" and run.progress < 1.0, "the job finished before it could be killed"

    monkeypatch.setenv("INSTRUCTLOOP_RUN_STALE_AFTER_S", "1")
    get_settings.cache_clear()
    # The killed worker's last heartbeat goes stale within a second; nothing else is running to reap.
    assert wait_until(lambda: reap_stale_runs(db), timeout=30, message="the killed run's heartbeat going stale") == [
        run.id
    ]
    db.commit()
    worker = start_celery_worker(log_path=tmp_path / "w2.log")
    try:
        send_pending_runs(db)
        db.commit()
        run = wait_until(
            lambda: (r := _run_of(db, batch_id)) and r.status in ("succeeded", "failed") and r,
            timeout=240,
            message="the resumed run to finish",
        )
    finally:
        stop_process(worker, timeout=30)
        monkeypatch.delenv("INSTRUCTLOOP_RUN_STALE_AFTER_S")
        get_settings.cache_clear()
    assert run.status == "succeeded", run.error
    assert run.attempts == 2
    counts = (
        db.execute(
            select(func.count())
            .select_from(Completion)
            .join(Prompt, Prompt.id == Completion.prompt_id)
            .where(Prompt.batch_id == batch_id)
            .group_by(Completion.prompt_id)
        )
        .scalars()
        .all()
    )
    assert len(counts) == 160 and set(counts) == {4}
    assert db.scalar(select(func.count()).select_from(Task).where(Task.batch_id == batch_id)) == 160


def test_job_requested_while_the_broker_is_down_runs_when_it_returns(
    committed_session, tiny_model_path, tmp_path, monkeypatch
):
    """A private Redis is stopped while a batch starts; the run waits in the outbox and runs after it returns."""
    from app.config import get_settings
    from app.outbox import sender

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    monkeypatch.setenv("INSTRUCTLOOP_BROKER_URL", url)
    get_settings.cache_clear()
    sender.cache_clear()
    try:
        db = committed_session
        batch_id = _seed_batch(db, tiny_model_path, n_prompts=3)  # no Redis listening: the send fails
        run = _run_of(db, batch_id)
        assert run.status == "queued" and run.enqueued_at is None
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0,
                timeout=10,
                message="the private Redis",
            )
            env = dict(os.environ, INSTRUCTLOOP_BROKER_URL=url)
            worker = start_celery_worker(env=env, log_path=tmp_path / "w.log")
            try:
                # The worker flushes the outbox when it starts (beat would do the same every 15 s).
                run = wait_until(
                    lambda: (r := _run_of(db, batch_id)) and r.status == "succeeded" and r,
                    timeout=120,
                    message="the run queued during the outage",
                )
            finally:
                stop_process(worker, timeout=30)
        finally:
            server.terminate()
            server.wait()
        assert run.attempts == 1 and run.enqueued_at is not None
    finally:
        monkeypatch.delenv("INSTRUCTLOOP_BROKER_URL")
        get_settings.cache_clear()
        sender.cache_clear()


def test_an_evaluation_is_sampled_by_the_worker_from_both_models(committed_session, celery_worker, tiny_model_path):
    """Two versions answer held-out prompts through the real worker; differing pairs become blind eval tasks."""
    from app.models import Evaluation, ModelVersion
    from app.quality.evaluations import start_evaluation
    from app.world import generate_prompts

    db = committed_session
    tag = time.monotonic_ns()
    source = PromptBatch(name=f"held-out-{tag}", status="completed")
    db.add(source)
    db.flush()
    for i, p in enumerate(generate_prompts(5, seed=11)):
        db.add(Prompt(batch_id=source.id, text=p.text, normalized_key=f"{tag:032x}{i:032x}", split="test"))
    a = ModelVersion(name=f"eval-a-{tag}", kind="sft", status="ready", artifact_path=str(tiny_model_path))
    b = ModelVersion(name=f"eval-b-{tag}", kind="sft", status="ready", artifact_path=str(tiny_model_path))
    db.add_all([a, b])
    db.flush()
    # Sampled (not greedy) from two copies of one random model: outputs differ on nearly every prompt.
    evaluation = start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=5, temperature=1.0, max_new_tokens=8)
    db.commit()
    run = wait_until(
        lambda: (r := _run_of(db, evaluation.batch_id)) and r.status in ("succeeded", "failed") and r,
        timeout=120,
        message="the evaluation's sampling run to finish",
    )
    assert run.status == "succeeded", run.error
    db.expire_all()
    evaluation = db.get(Evaluation, evaluation.id)
    outputs = db.execute(
        select(Completion.model_version_id, func.count())
        .join(Prompt, Prompt.id == Completion.prompt_id)
        .where(Prompt.batch_id == evaluation.batch_id)
        .group_by(Completion.model_version_id)
    ).all()
    assert dict(outputs) == {a.id: 5, b.id: 5}
    tasks = db.scalars(select(Task).where(Task.batch_id == evaluation.batch_id)).all()
    assert len(tasks) + evaluation.n_identical == 5 and {t.kind for t in tasks} <= {"eval"}
    assert run.metrics["tasks_created"] == len(tasks)
    # Two copies of one random model, sampled: identical outputs on all 5 prompts would be a sampling bug.
    assert tasks, f"no eval task: all {evaluation.n_identical} pairs were identical"
    assert evaluation.status == "labeling"
    for task in tasks:
        items = db.scalars(select(TaskItem).where(TaskItem.task_id == task.id).order_by(TaskItem.position)).all()
        models = [db.get(Completion, item.completion_id).model_version_id for item in items]
        assert models == [a.id, b.id]
