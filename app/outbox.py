"""Background jobs: the Celery configuration and the outbox that hands runs to the broker.

A job is a `training_runs` row first (PostgreSQL is the source of truth) and
a broker message second. `enqueue_run` adds the row; once the transaction
commits, the message is sent by task name (the web never imports the
worker). If the broker is down at that moment the row simply stays unsent
(`enqueued_at` is NULL) and `send_pending_runs` — called by beat and at
worker start — sends it later, so no job is lost. A message delivered twice
is harmless: the task claims its run with a conditional UPDATE.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import lru_cache

from celery import Celery
from sqlalchemy import Connection, event, or_, select, update
from sqlalchemy.orm import Session, SessionTransaction

from app.config import Settings, get_settings
from app.models import TrainingRun, utcnow

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"

# Task name per run kind; every one of them needs the model, so they go to the GPU queue.
RUN_TASKS = {
    "pretrain": "instructloop.pretrain",
    "sample": "instructloop.sample_batch",
    "sft": "instructloop.train_sft",
    "rm": "instructloop.train_rm",
    "ppo": "instructloop.train_ppo",
    "validate": "instructloop.validate_model",
    "dpo": "instructloop.train_dpo",
}
LIGHT_TASKS = (
    "instructloop.ping",
    "instructloop.torch_threads",
    "instructloop.dispatch_pending_runs",
    "instructloop.reap_stale_runs",
    "instructloop.expire_leases",
    "instructloop.check_retrain",
    "instructloop.deliver_webhooks",
)
TASK_ROUTES = {name: {"queue": GPU_QUEUE} for name in RUN_TASKS.values()} | {
    name: {"queue": DEFAULT_QUEUE} for name in LIGHT_TASKS
}

# A sent run that no worker claimed within this time is sent again (Redis may have lost it).
UNCLAIMED_AFTER = timedelta(minutes=10)


def celery_config(settings: Settings) -> dict:
    """Returns the Celery settings shared by the web (sender), the worker and beat."""
    config: dict = {
        "broker_url": settings.resolved_broker_url,
        "task_routes": TASK_ROUTES,
        "task_default_queue": DEFAULT_QUEUE,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Long GPU jobs: take one message at a time and acknowledge it only when done, so a
        # killed worker's job is delivered again (the run's conditional claim prevents doubles).
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": settings.job_time_limit_s,
        "task_time_limit": settings.job_time_limit_s + 300,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "dispatch-pending-runs": {
                "task": "instructloop.dispatch_pending_runs",
                "schedule": settings.beat_dispatch_s,
            },
            "reap-stale-runs": {"task": "instructloop.reap_stale_runs", "schedule": settings.beat_reap_s},
            "expire-leases": {"task": "instructloop.expire_leases", "schedule": settings.beat_expire_leases_s},
            "check-retrain": {"task": "instructloop.check_retrain", "schedule": settings.beat_retrain_s},
            "deliver-webhooks": {"task": "instructloop.deliver_webhooks", "schedule": settings.beat_webhooks_s},
        },
    }
    if config["broker_url"].startswith("filesystem://"):
        folder = str(settings.broker_dir)
        settings.broker_dir.mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "store_processed": False,
            # Worker pings and remote control live beside the messages, not in the current directory.
            "control_folder": str(settings.broker_dir / "control"),
        }
    else:
        # Longer than any job: the claim makes a redelivery harmless, but there is no need for one.
        config["broker_transport_options"] = {"visibility_timeout": 8 * 3600}
    return config


@lru_cache
def sender() -> Celery:
    """Returns a Celery app that only sends tasks by name (the web side)."""
    app = Celery("instructloop-sender")
    app.conf.update(celery_config(get_settings()))
    # A request must not wait on a dead broker: fail at once and leave the run to the outbox, instead of
    # kombu's and redis-py's connection retries (about 6 s per send while Redis is down, bench/fault_redis.py).
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_retries": 0}
    return app


def enqueue_run(db: Session, run: TrainingRun) -> TrainingRun:
    """Adds a run and arranges for its message to be sent once the transaction commits."""
    db.add(run)
    db.flush()
    if not db.info.get("outbox_listening"):
        event.listen(db, "after_commit", _send_after_commit)
        event.listen(db, "after_soft_rollback", _forget_after_rollback)
        db.info["outbox_listening"] = True
    db.info.setdefault("pending_runs", set()).add(run.id)
    return run


def _forget_after_rollback(db: Session, previous_transaction: SessionTransaction) -> None:
    if not previous_transaction.nested and previous_transaction.parent is None:  # the whole transaction
        db.info.pop("pending_runs", None)


def _send_after_commit(db: Session) -> None:
    if db.in_nested_transaction():
        return  # only a savepoint was released; the rows are not visible to others yet
    run_ids = db.info.pop("pending_runs", set())
    if not run_ids:
        return
    bind = db.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    # after_commit may not use the session itself; a short connection of our own records the send.
    with engine.connect() as conn:
        rows = conn.execute(select(TrainingRun.id, TrainingRun.kind).where(TrainingRun.id.in_(run_ids))).all()
        for run_id, kind in rows:
            if _send(run_id, kind):
                conn.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(enqueued_at=utcnow()))
        conn.commit()


def _send(run_id: int, kind: str) -> bool:
    try:
        # No retries here: a request must not hang on a dead broker; the outbox sends it later.
        sender().send_task(RUN_TASKS[kind], args=[run_id], retry=False)
        return True
    except Exception as exc:  # broker unreachable: the run stays in the outbox
        log.warning("broker unavailable, run %s stays queued for later dispatch: %s", run_id, exc)
        return False


def send_pending_runs(db: Session) -> int:
    """Sends queued runs that never reached the broker or were never claimed; returns how many."""
    now = utcnow()
    runs = db.scalars(
        select(TrainingRun)
        .where(
            TrainingRun.status == "queued",
            or_(TrainingRun.enqueued_at.is_(None), TrainingRun.enqueued_at < now - UNCLAIMED_AFTER),
        )
        .order_by(TrainingRun.id)
        .limit(100)
    ).all()
    sent = 0
    for run in runs:
        if _send(run.id, run.kind):
            run.enqueued_at = now
            sent += 1
    return sent
