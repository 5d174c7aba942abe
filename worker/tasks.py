"""Celery tasks: the light housekeeping jobs and the GPU jobs that sample and train.

Every GPU job receives only a run id. `execute_run` claims the run with a
conditional UPDATE (a duplicate message does nothing), hands the work a
`RunReporter` for heartbeats and progress, and records success or failure
with the traceback. The stage bodies live in `worker.jobs`; torch is
imported there, inside the task, never when this module loads.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app import runs
from app.config import get_settings
from app.db import session_scope
from app.outbox import send_pending_runs
from app.registry import versions as registry
from worker.celery_app import app, cap_torch_threads

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    """The run was reaped, cancelled or taken over; this worker must stop working on it."""


class RunReporter:
    """Writes a run's heartbeat, progress and live metrics, at most every `min_interval` seconds."""

    def __init__(self, run_id: int, min_interval: float = 2.0):
        self.run_id = run_id
        self.min_interval = min_interval
        self._last = 0.0

    def __call__(
        self, progress: float, message: str | None = None, metrics: dict[str, Any] | None = None, force: bool = False
    ) -> None:
        now = time.monotonic()
        with session_scope() as db:
            if not force and now - self._last < self.min_interval:
                # Between heartbeats a read still stops a cancelled run at its next step, not seconds later.
                held = runs.is_held(db, self.run_id)
            else:
                self._last = now
                held = runs.heartbeat(db, self.run_id, progress, message, metrics)
        if not held:
            raise RunCancelled(f"run {self.run_id} is no longer held by this worker")


JobBody = Callable[[int, RunReporter], tuple[dict[str, Any], int | None]]


def _job(name: str) -> JobBody:
    """The body `name` of worker.jobs, imported once the run is claimed."""

    # Imported inside execute_run's try, so a broken install or a time limit tripping during the
    # (slow) torch import fails the run with its reason instead of leaving it queued, its message acknowledged.
    def body(run_id: int, report: RunReporter) -> tuple[dict[str, Any], int | None]:
        from worker import jobs

        cap_torch_threads()
        return getattr(jobs, name)(run_id, report)

    return body


def _timed_out(exc: BaseException) -> bool:
    """Whether the soft time limit caused `exc`, also when it struck mid-query and surfaced as the database error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SoftTimeLimitExceeded):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def execute_run(run_id: int, body: JobBody) -> str:
    """Claims a run, runs its body and records the outcome; returns the final status."""
    with session_scope() as db:
        if not runs.claim_run(db, run_id):
            log.info("run %s is not queued (done, running elsewhere or unknown); nothing to do", run_id)
            return "skipped"
    reporter = RunReporter(run_id)
    try:
        metrics, version_id = body(run_id, reporter)
    except RunCancelled as exc:
        log.warning("%s", exc)
        return "cancelled"
    except Exception as exc:  # the run records the failure; the message is acknowledged
        if _timed_out(exc):
            limit = get_settings().job_time_limit_s
            error = f"time limit exceeded: the job ran longer than {limit} s (INSTRUCTLOOP_JOB_TIME_LIMIT_S)"
        else:
            log.exception("run %s failed", run_id)
            error = f"{type(exc).__name__}: {exc}"
        with session_scope() as db:
            runs.fail_run(db, run_id, error, traceback.format_exc())
        return "failed"
    with session_scope() as db:
        # The run's success and its model's release are one transaction, and only if the run is still ours.
        if not runs.finish_run(db, run_id, metrics=metrics, output_version_id=version_id):
            log.warning("run %s was cancelled or reaped before it finished; its result is dropped", run_id)
            return "cancelled"
        if version_id is not None:
            registry.mark_ready(db, version_id, metrics)
    return "succeeded"


# --- GPU queue --------------------------------------------------------------------------------


@app.task(name="instructloop.sample_batch")
def sample_batch(run_id: int) -> str:
    """Samples K outputs per prompt of a batch from its policy and opens the batch for labeling."""
    return execute_run(run_id, _job("run_sampling"))


@app.task(name="instructloop.pretrain")
def pretrain(run_id: int) -> str:
    """Pretrains the bundled world's tiny base model and registers it."""
    return execute_run(run_id, _job("run_pretrain"))


@app.task(name="instructloop.train_sft")
def train_sft(run_id: int) -> str:
    """Fine-tunes the base model on the collected demonstrations."""
    return execute_run(run_id, _job("run_sft"))


@app.task(name="instructloop.train_rm")
def train_rm(run_id: int) -> str:
    """Trains the reward model on the collected rankings, K outputs per micro-batch."""
    return execute_run(run_id, _job("run_rm"))


@app.task(name="instructloop.train_ppo")
def train_ppo(run_id: int) -> str:
    """Optimises the policy against the reward model with PPO."""
    return execute_run(run_id, _job("run_ppo"))


@app.task(name="instructloop.train_dpo")
def train_dpo(run_id: int) -> str:
    """Trains the SFT policy on whole rankings with DPO (pairwise or listwise), no reward model."""
    return execute_run(run_id, _job("run_dpo"))


@app.task(name="instructloop.validate_model")
def validate_model(run_id: int) -> str:
    """Validates a model registered from a folder or hub id; it becomes ready, or failed with the reason."""
    return execute_run(run_id, _job("run_validate"))


# --- default queue ----------------------------------------------------------------------------


@app.task(name="instructloop.ping")
def ping() -> str:
    """Answers, proving a worker consumes the default queue."""
    return "pong"


@app.task(name="instructloop.torch_threads")
def torch_threads() -> int:
    """Says how many intra-op threads torch uses in this worker process (INSTRUCTLOOP_WORKER_TORCH_THREADS)."""
    import torch

    cap_torch_threads()
    return torch.get_num_threads()


@app.task(name="instructloop.dispatch_pending_runs")
def dispatch_pending_runs() -> int:
    """Sends runs that never reached the broker (or were lost by it)."""
    with session_scope() as db:
        return send_pending_runs(db)


@app.task(name="instructloop.reap_stale_runs")
def reap_stale_runs() -> list[int]:
    """Re-queues runs whose worker stopped sending heartbeats, then sends them."""
    with session_scope() as db:
        reaped = runs.reap_stale_runs(db)
    if reaped:
        with session_scope() as db:
            send_pending_runs(db)
    return reaped


@app.task(name="instructloop.expire_leases")
def expire_leases() -> int:
    """Returns expired task leases to the pool."""
    from app.labeling.leases import expire_leases as expire

    with session_scope() as db:
        return expire(db)


@app.task(name="instructloop.check_retrain")
def check_retrain() -> list[str]:
    """Starts SFT, RM or PPO when enough new data arrived since the last run of each."""
    from app.training.data import start_due_runs

    with session_scope() as db:
        return [run.kind for run in start_due_runs(db)]


@app.task(name="instructloop.deliver_webhooks")
def deliver_webhooks() -> int:
    """Sends due webhook events (signed, retried with backoff); returns how many were attempted."""
    from app.webhooks.service import deliver_due

    with session_scope() as db:
        report = deliver_due(db)
    return report.delivered + report.retrying + report.failed
