"""The worker's Celery app: the shared configuration plus the tasks in `worker.tasks`.

torch is imported inside tasks only, never at import time, so the parent
process of a prefork worker never initialises CUDA and each child (a fresh
one per GPU job, `--max-tasks-per-child=1`) gives its GPU memory back.
Each child caps torch's intra-op threads to its share of the CPUs
(`INSTRUCTLOOP_WORKER_TORCH_THREADS`), so parallel children do not oversubscribe them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

from app import loop
from app.config import get_settings
from app.outbox import celery_config

loop.wire()
app = Celery("instructloop", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))


@worker_ready.connect
def _flush_outbox(sender: Any = None, **_kwargs: Any) -> None:  # pragma: no cover - exercised by the integration tests
    # Runs queued while the broker was away are sent as soon as a worker is up again.
    sender.app.send_task("instructloop.dispatch_pending_runs")


# The worker's --concurrency, recorded by the parent before it forks its pool; the children inherit it.
_concurrency = 1


def torch_threads(setting: int | None, concurrency: int, cpus: int | None = None) -> int:
    """The intra-op threads of one worker process: the setting, else its share of the CPUs it may use (>= 1)."""
    if setting is not None:
        return max(1, setting)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, concurrency))


@worker_init.connect
def _record_concurrency(sender: Any = None, **_kwargs: Any) -> None:  # pragma: no cover - runs in the worker
    global _concurrency
    _concurrency = int(getattr(sender, "concurrency", None) or 1)


# This process's cap, decided when the pool starts it; applied when torch is first needed (see `cap_torch_threads`).
_threads: int | None = None


@worker_process_init.connect
def _decide_torch_threads(**_kwargs: Any) -> None:  # pragma: no cover - runs in each worker process
    global _threads
    _threads = torch_threads(get_settings().worker_torch_threads, _concurrency)
    # For native libraries that read them at load; torch itself takes the cap from set_num_threads.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(_threads)
    if "torch" in sys.modules:  # imported already: apply it now
        cap_torch_threads()


def cap_torch_threads() -> None:
    """Sets torch's intra-op threads to this worker process's cap; the tasks call it before any torch work.

    Imports torch, so it runs inside a task, not at start: a child that only does housekeeping never loads torch.
    """
    if _threads is None:  # not a pool process (a test calling a job directly): leave torch as it is
        return
    import torch

    if torch.get_num_threads() != _threads:
        torch.set_num_threads(_threads)
