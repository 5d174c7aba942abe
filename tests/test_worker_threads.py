"""Threads: each Celery worker process caps torch's intra-op threads to its share of the CPUs.

A real worker process (started with the project's CLI, prefork pool) answers a task that reports
`torch.get_num_threads()`; its log line carries the answer (the app keeps no results).
"""

from __future__ import annotations

import os

import redis

from app.outbox import sender
from tests.conftest import REDIS_URL, start_celery_worker, stop_process, wait_until
from worker.celery_app import torch_threads


def threads_reported(proc_log, message_id: str) -> int:
    done = f"Task instructloop.torch_threads[{message_id}] succeeded"
    line = wait_until(
        lambda: next((line for line in proc_log.read_text(errors="replace").splitlines() if done in line), None),
        timeout=120,
        message="the worker answering instructloop.torch_threads",
    )
    return int(line.rsplit(":", 1)[1])


def test_a_worker_process_uses_the_configured_torch_threads(committed, tmp_path):
    redis.Redis.from_url(REDIS_URL).flushdb()
    log = tmp_path / "worker.log"
    proc = start_celery_worker(env={**os.environ, "INSTRUCTLOOP_WORKER_TORCH_THREADS": "3"}, log_path=log)
    try:
        message = sender().send_task("instructloop.torch_threads")
        assert threads_reported(log, message.id) == 3
    finally:
        stop_process(proc, timeout=30)


def test_by_default_each_process_gets_its_share_of_the_cpus():
    assert torch_threads(None, 1, cpus=16) == 16
    assert torch_threads(None, 4, cpus=16) == 4
    assert torch_threads(None, 3, cpus=2) == 1  # at least one
    assert torch_threads(5, 4, cpus=16) == 5  # the setting wins
    assert torch_threads(None, 1) == len(os.sched_getaffinity(0))  # the CPUs this process may use
