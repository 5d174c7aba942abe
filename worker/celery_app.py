"""The worker's Celery app: the shared configuration plus the tasks in `worker.tasks`.

torch is imported inside tasks only, never at import time, so the parent
process of a prefork worker never initialises CUDA and each child (a fresh
one per GPU job, `--max-tasks-per-child=1`) gives its GPU memory back.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_ready

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
