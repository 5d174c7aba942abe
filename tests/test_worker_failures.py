"""Jobs that fail, are cancelled, run out of time, pretrain, or are started by beat, in real worker processes.

Everything here runs in a real Celery worker on the test Redis and PostgreSQL, started as a subprocess:
nothing of the worker is patched from the test process, so a failure is provoked the way it happens in
production (no data, a missing model, a model whose embedding table is smaller than its tokenizer so
training breaks mid-epoch, a time limit, an admin's cancel through the HTTP API). Waits are bounded and
say which process stopped answering; their logs are attached to the failure message.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.models import Assignment, ModelVersion, TrainingRun, User, WebhookDelivery, utcnow
from tests.conftest import DATA_DIR, REDIS_URL, ROOT, start_celery_worker, stop_process, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # real workers that train; the limit only catches a hang


# --- helpers ------------------------------------------------------------------------------------


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not Path(path).exists():
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def wait_for(predicate, *, timeout: float, what: str, logs: tuple[Path, ...] = (), interval: float = 0.25):
    """Polls until `predicate` returns something truthy; on timeout fails naming what did not happen."""
    try:
        return wait_until(predicate, timeout=timeout, interval=interval, message=what)
    except TimeoutError:
        tails = "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in logs)
        pytest.fail(f"liveness: {what} did not happen within {timeout:.0f} s\n{tails}")


def _run(db, run_id: int) -> TrainingRun:
    db.expire_all()
    return db.get(TrainingRun, run_id)


def _finished(db, run_id: int, worker, timeout: float = 180) -> TrainingRun:
    return wait_for(
        lambda: (r := _run(db, run_id)).status in ("succeeded", "failed", "cancelled") and r,
        timeout=timeout,
        what=f"the worker finishing run {run_id}",
        logs=(worker.log_path,),
    )


def _versions_of(db, run_id: int) -> list[ModelVersion]:
    db.expire_all()
    return list(db.scalars(select(ModelVersion).where(ModelVersion.training_run_id == run_id)))


def _tiny_base(name: str) -> Path:
    """The tests' tiny character-level model, saved once per test run where worker processes can read it."""
    from tests.tiny_lm import save_tiny_model

    path = DATA_DIR / name
    if not (path / "config.json").exists():
        save_tiny_model(path)
    return path


def _mismatched_base(name: str) -> Path:
    """A model whose tokenizer knows one token ("#") more than its embedding table has rows.

    Registering a model with the wrong tokenizer is a real mistake; training on it works until the
    first example that uses the extra token reaches the model, and then the forward pass raises.
    """
    from tests.tiny_lm import char_tokenizer
    from worker.modeling import save_model, tiny_causal_lm

    path = DATA_DIR / name
    if not (path / "config.json").exists():
        tokenizer = char_tokenizer()
        rows = len(tokenizer)
        tokenizer.add_tokens(["#"])
        model = tiny_causal_lm(
            tokenizer,
            seed=0,
            vocab_size=rows,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        save_model(model, tokenizer, path)
    return path


def _demonstrations(db, texts: list[str]) -> None:
    """Collects one demonstration per text through the labeling service, in this order (= id order)."""
    from app.labeling import leases, submissions
    from tests.test_labeling import seed_batch

    seed_batch(
        db,
        n_prompts=len(texts),
        rankings=False,
        demonstrations=True,
        prompt_texts=[f"Say the answer to question {i}." for i in range(len(texts))],
    )
    labeler = User(username=f"demonstrator-{time.monotonic_ns()}", role="labeler", password_hash="unused")
    db.add(labeler)
    db.flush()
    for text in texts:
        assignment = leases.lease_next_task(db, labeler, "demonstration")
        submissions.submit_demonstration(db, labeler, assignment.id, text)
    db.commit()


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    """A webhook receiver on 127.0.0.1 recording what it is sent."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def hook(committed_session, receiver):
    """A webhook subscribed to failed runs, pointing at the local receiver."""
    from app.webhooks import service as webhooks

    hook = webhooks.create_webhook(
        committed_session, f"http://127.0.0.1:{receiver.server_port}/hook", ["training_run.failed"]
    )
    committed_session.commit()
    return hook


def _assert_failure_announced(db, run: TrainingRun, hook, receiver, worker, expected: str) -> dict:
    """The failure's webhook row exists with the run's error, and the worker delivers it, signed."""
    from app.outbox import sender
    from app.webhooks.service import verify_signature

    deliveries = [
        d
        for d in db.scalars(select(WebhookDelivery).where(WebhookDelivery.event == "training_run.failed"))
        if d.payload["data"]["run_id"] == run.id
    ]
    assert len(deliveries) == 1, "training_run.failed was not queued exactly once"
    data = deliveries[0].payload["data"]
    assert data["kind"] == run.kind and expected in data["error"]
    sender().send_task("instructloop.deliver_webhooks")  # what beat does every few seconds
    headers, body = wait_for(
        lambda: receiver.received and receiver.received[0],
        timeout=60,
        what="the worker delivering the training_run.failed webhook",
        logs=(worker.log_path,),
    )
    assert headers["x-instructloop-event"] == "training_run.failed"
    assert verify_signature(hook.secret, headers["x-instructloop-timestamp"], body, headers["x-instructloop-signature"])
    sent = json.loads(body)
    assert sent["id"] == deliveries[0].event_id and sent["data"] == data
    wait_for(
        lambda: (db.expire_all(), db.get(WebhookDelivery, deliveries[0].id).status == "delivered")[1],
        timeout=30,
        what="the delivery recorded as delivered",
        logs=(worker.log_path,),
    )
    return sent


def _nothing_promoted_by(db, run_id: int) -> None:
    for version in _versions_of(db, run_id):
        assert version.status == "failed", f"{version.name} is {version.status} after its run failed"
    db.expire_all()
    assert db.scalar(select(ModelVersion).where(ModelVersion.kind == "sft", ModelVersion.status == "promoted")) is None


# --- failures -----------------------------------------------------------------------------------


def test_sft_without_demonstrations_fails_with_its_reason_and_announces_it(
    committed_session, celery_worker, hook, receiver
):
    from app.registry.versions import register_base_model
    from app.runs import start_run

    db = committed_session
    register_base_model(db, str(_tiny_base("tiny-base")))
    run = start_run(db, "sft")
    db.commit()
    run = _finished(db, run.id, celery_worker)
    assert run.status == "failed"
    assert run.error == "RuntimeError: no demonstrations in the train split yet"
    assert "Traceback" in run.traceback and run.attempts == 1
    assert _versions_of(db, run.id) == []  # refused before a version was registered
    _nothing_promoted_by(db, run.id)
    _assert_failure_announced(db, run, hook, receiver, celery_worker, "no demonstrations")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("deleted", "does not exist"),
        ("emptied", "holds no saved model (no config.json)"),
    ],
)
def test_sft_from_a_base_whose_files_are_gone_fails_and_its_version_is_failed(
    committed_session, celery_worker, hook, receiver, damage, reason
):
    from app.registry.versions import register_base_model
    from app.runs import start_run

    db = committed_session
    missing = DATA_DIR / f"{damage}-base-model"
    if damage == "emptied":
        missing.mkdir(exist_ok=True)
    register_base_model(db, str(missing))
    _demonstrations(db, ["four", "seven", "nine"])
    run = start_run(db, "sft", params={"epochs": 1})
    db.commit()
    run = _finished(db, run.id, celery_worker)
    assert run.status == "failed"
    assert run.error == f"FileNotFoundError: model folder {missing} {reason}"
    versions = _versions_of(db, run.id)
    assert [v.status for v in versions] == ["failed"]  # registered as `training`, then failed with the run
    _nothing_promoted_by(db, run.id)
    _assert_failure_announced(db, run, hook, receiver, celery_worker, str(missing))


def test_sft_that_breaks_mid_epoch_fails_after_its_first_steps(committed_session, celery_worker, hook, receiver):
    """The third example the trainer meets uses a token the model has no embedding for."""
    from app.registry.versions import register_base_model
    from app.runs import start_run
    from worker.common import shuffled_batches

    db = committed_session
    register_base_model(db, str(_mismatched_base("mismatched-base")))
    texts = [f"answer {word}" for word in ("one", "two", "three", "four", "five", "six")]
    # One demonstration per step, in the trainer's (seeded) order: poison the one it reaches third.
    third = shuffled_batches(len(texts), 1, seed=0, epoch=0)[2][0]
    texts[third] = "answer #"
    _demonstrations(db, texts)
    run = start_run(db, "sft", params={"epochs": 1, "batch_size": 1, "micro_batch_size": 1, "seed": 0})
    db.commit()
    run = _finished(db, run.id, celery_worker)
    assert run.status == "failed"
    assert run.error.startswith("IndexError") and "index out of range" in run.error, run.error
    assert run.progress > 0 and run.metrics["curve"][0]["step"] == 1  # it trained before it broke
    assert [v.status for v in _versions_of(db, run.id)] == ["failed"]
    _nothing_promoted_by(db, run.id)
    _assert_failure_announced(db, run, hook, receiver, celery_worker, "index out of range")


# --- cancel -------------------------------------------------------------------------------------


def _checkpoint_step(run_id: int) -> int | None:
    import torch

    path = DATA_DIR / "artifacts" / "runs" / str(run_id) / "checkpoint" / "checkpoint.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["history"]["step"]


def test_cancel_through_the_api_stops_the_worker_at_its_next_step(committed_session, celery_worker, live_server):
    import httpx

    from app.registry.versions import register_base_model
    from app.runs import start_run
    from app.security import create_api_token

    db = committed_session
    admin = User(username="cancelling-admin", role="admin", password_hash="unused")
    db.add(admin)
    db.flush()
    token, _ = create_api_token(db, admin, ["admin"])
    register_base_model(db, str(_tiny_base("tiny-base")))
    _demonstrations(db, [f"answer {n}" for n in range(12)])
    # About 12,000 one-example steps, each checkpointed: far longer than the test waits.
    run = start_run(
        db,
        "sft",
        params={
            "epochs": 1000,
            "batch_size": 1,
            "micro_batch_size": 1,
            "checkpoint_every": 1,
            "early_stopping_patience": None,
        },
    )
    db.commit()
    wait_for(
        lambda: _run(db, run.id).progress > 0 and (_checkpoint_step(run.id) or 0) > 0,
        timeout=180,
        what=f"run {run.id} training (progress and a checkpoint)",
        logs=(celery_worker.log_path,),
    )

    answer = httpx.post(f"{live_server}/api/v1/runs/{run.id}/cancel", headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    at_cancel = _checkpoint_step(run.id)  # every step checkpoints before it checks whether to go on

    # The worker is free again: the next run (a short one) is taken and finished.
    following = start_run(db, "sft", params={"epochs": 1, "batch_size": 4})
    db.commit()
    following = _finished(db, following.id, celery_worker)
    assert following.status == "succeeded", following.error

    stopped_at = _checkpoint_step(run.id)
    assert stopped_at is not None, "the cancelled run's last checkpoint was removed"
    assert at_cancel <= stopped_at <= at_cancel + 1, (
        f"the worker went on from step {at_cancel} to {stopped_at} after the cancel instead of stopping at the next"
    )
    run = _run(db, run.id)
    assert run.status == "cancelled" and run.message == "cancelled by cancelling-admin" and run.progress < 0.5
    assert run.output_version_id is None
    assert [v.status for v in _versions_of(db, run.id)] == ["failed"]
    promoted = db.scalar(select(ModelVersion).where(ModelVersion.kind == "sft", ModelVersion.status == "promoted"))
    assert promoted.training_run_id == following.id  # the cancelled run's model was never usable


# --- time limit ---------------------------------------------------------------------------------


def test_a_job_over_the_time_limit_fails_saying_so(committed_session, tmp_path):
    """INSTRUCTLOOP_JOB_TIME_LIMIT_S is Celery's soft time limit; a worker started with a tiny one trips it."""
    import redis

    from app.registry.versions import register_base_model
    from app.runs import start_run

    redis.Redis.from_url(REDIS_URL).flushdb()
    db = committed_session
    register_base_model(db, str(_tiny_base("tiny-base")))
    _demonstrations(db, [f"answer {n}" for n in range(8)])
    log = tmp_path / "worker.log"
    worker = start_celery_worker(env=dict(os.environ, INSTRUCTLOOP_JOB_TIME_LIMIT_S="8"), log_path=log)
    worker.log_path = log
    try:
        run = start_run(
            db, "sft", params={"epochs": 5000, "batch_size": 1, "micro_batch_size": 1, "early_stopping_patience": None}
        )
        db.commit()
        run = _finished(db, run.id, worker)
    finally:
        stop_process(worker, timeout=30)
    assert run.status == "failed"
    assert run.error == "time limit exceeded: the job ran longer than 8 s (INSTRUCTLOOP_JOB_TIME_LIMIT_S)"
    assert "SoftTimeLimitExceeded" in run.traceback
    assert {v.status for v in _versions_of(db, run.id)} <= {"failed"}


# --- pretraining --------------------------------------------------------------------------------


def test_pretrain_run_registers_a_base_model(committed_session, celery_worker):
    from app.runs import start_run

    db = committed_session
    run = start_run(db, "pretrain", params={"steps": 3, "seed": 1})
    db.commit()
    run = _finished(db, run.id, celery_worker, timeout=300)
    assert run.status == "succeeded", run.error
    assert run.output_version_id is not None, "the pretrain run registered no base model"
    version = db.get(ModelVersion, run.output_version_id)
    assert version.kind == "base" and version.status == "promoted" and version.training_run_id == run.id
    assert (Path(version.artifact_path) / "config.json").exists()
    assert version.metrics["steps"] == 3 and run.metrics["steps"] == 3


# --- beat ---------------------------------------------------------------------------------------
# Kept last in the module: their worker and beat live for the module and would take other tests' jobs.

BEAT_ENV = {
    "INSTRUCTLOOP_BEAT_DISPATCH_S": "1",
    "INSTRUCTLOOP_BEAT_REAP_S": "1",
    "INSTRUCTLOOP_BEAT_EXPIRE_LEASES_S": "1",
    "INSTRUCTLOOP_BEAT_RETRAIN_S": "1",
    "INSTRUCTLOOP_BEAT_WEBHOOKS_S": "1",
    # Real jobs here heartbeat every 2 s; only the planted run's hour-old heartbeat is stale.
    "INSTRUCTLOOP_RUN_STALE_AFTER_S": "120",
    "INSTRUCTLOOP_RETRAIN_MIN_NEW_DEMONSTRATIONS": "2",
    "INSTRUCTLOOP_RETRAIN_MIN_NEW_RANKINGS": "1000000",
}


@pytest.fixture(scope="module")
def beat(pg_engine, tmp_path_factory):
    """A real worker and a real `instructloop beat` on one-second schedules; yields their log paths."""
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    logs = tmp_path_factory.mktemp("beat")
    env = dict(os.environ, **BEAT_ENV)
    worker = start_celery_worker(env=env, log_path=logs / "worker.log")
    with open(logs / "beat.log", "ab") as out:
        beat = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "beat", "--loglevel", "info"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield logs / "worker.log", logs / "beat.log"
    finally:
        stop_process(beat)
        stop_process(worker, timeout=30)


def test_beat_dispatches_a_run_that_never_reached_the_broker(committed_session, beat):
    db = committed_session
    run = TrainingRun(kind="rm", params={}, triggered_by="test")  # added without the outbox: never sent
    db.add(run)
    db.commit()
    run = wait_for(
        lambda: (r := _run(db, run.id)).enqueued_at is not None and r.attempts == 1 and r,
        timeout=60,
        what="beat's dispatch-pending-runs sending the unsent run to the worker",
        logs=beat,
    )
    run = wait_for(
        lambda: (r := _run(db, run.id)).status == "failed" and r,
        timeout=120,
        what="the worker running the dispatched run",
        logs=beat,
    )
    assert run.error == "RuntimeError: no SFT or base model to start the reward model from"


def test_beat_returns_an_expired_lease(committed_session, beat):
    from app.labeling import leases
    from tests.test_labeling import seed_batch

    db = committed_session
    seed_batch(db, n_prompts=1)
    labeler = User(username="lapsed-labeler", role="labeler", password_hash="unused")
    db.add(labeler)
    db.flush()
    assignment = leases.lease_next_task(db, labeler, "ranking")
    assignment.expires_at = utcnow() - timedelta(minutes=1)
    db.commit()
    wait_for(
        lambda: (db.expire_all(), db.get(Assignment, assignment.id).state == "expired")[1],
        timeout=60,
        what="beat's expire-leases returning the lapsed lease",
        logs=beat,
    )


def test_beat_requeues_a_run_whose_worker_went_silent(committed_session, beat):
    db = committed_session
    an_hour_ago = utcnow() - timedelta(hours=1)
    run = TrainingRun(
        kind="rm",
        params={},
        triggered_by="test",
        status="running",
        worker="gone-host:1",
        attempts=1,
        started_at=an_hour_ago,
        heartbeat_at=an_hour_ago,
        enqueued_at=an_hour_ago,
    )
    db.add(run)
    db.commit()
    run = wait_for(
        lambda: (r := _run(db, run.id)).attempts == 2 and r.status == "failed" and r,
        timeout=120,
        what="beat's reaper re-queuing the silent run and the worker taking it",
        logs=beat,
    )
    assert run.message == "re-queued: worker gone-host:1 stopped answering"
    assert run.worker != "gone-host:1"


def test_beat_starts_a_due_retraining(committed_session, beat):
    from app.registry.versions import register_base_model

    db = committed_session
    register_base_model(db, str(_tiny_base("tiny-base")))
    _demonstrations(db, ["answer one", "answer two"])
    scheduled = wait_for(
        lambda: (db.expire_all(), db.scalar(select(TrainingRun).where(TrainingRun.triggered_by == "schedule")))[1],
        timeout=60,
        what="beat's retrain check starting the due SFT run",
        logs=beat,
    )
    assert scheduled.kind == "sft"
    run = wait_for(
        lambda: (r := _run(db, scheduled.id)).status in ("succeeded", "failed") and r,
        timeout=180,
        what="the worker training the scheduled SFT run",
        logs=beat,
    )
    assert run.status == "succeeded", run.error
    assert db.get(ModelVersion, run.output_version_id).status == "promoted"
