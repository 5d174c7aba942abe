"""Fault scenario: kill -9 the Celery worker in the middle of a training run (SFT on the bundled world model).

An admin starts an SFT run through the API (POST /api/v1/runs); a real Celery
worker (private Redis, private PostgreSQL) claims it, trains the tiny world
model in models/world-base on seeded demonstrations and checkpoints as it
goes; a second worker stands by, as a second GPU machine would. Once the run
has made progress and written a checkpoint, the worker running it (its whole
process group) gets SIGKILL, as a crashed machine would. The reaper
(`instructloop.reap_stale_runs`, which beat sends every 60 s; here every 2 s,
with a short staleness limit) re-queues the run whose heartbeat stopped, and
the standby worker resumes it from the checkpoint.

The property, watched every 0.2 s from start to end: the run finishes exactly
once (succeeded, two attempts, one model version, one `model_version.registered`
event), and its model is never `ready` or `promoted` before the run succeeded
(no partial model is ever usable); the final model's files are complete.

    .venv/bin/python bench/fault_celery_worker.py            # 400 demonstrations, 2 epochs
    .venv/bin/python bench/fault_celery_worker.py --quick    # 300 demonstrations, 2 epochs, kill at 25 %

The last line of stdout is one JSON object; the exit status is 1 when the property breaks.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, load_avg, start_celery_worker, stop_server, wait_until
from bench.labelers import Stack

STALE_AFTER_S = 5  # the run's heartbeat is older than this: the reaper re-queues it


class Watcher(threading.Thread):
    """Polls the run and its model versions; records every state seen and any model usable too early."""

    def __init__(self, url: str, run_id: int):
        super().__init__(daemon=True)
        from sqlalchemy import create_engine

        self.engine, self.run_id = create_engine(url), run_id
        self.seen: list[tuple[float, str, float, int, tuple]] = []
        self.early: list[str] = []
        self.stop = threading.Event()

    def snapshot(self) -> tuple[str, float, int, tuple, dict]:
        with self.engine.connect() as conn:
            status, progress, attempts, metrics = conn.exec_driver_sql(
                "SELECT status, progress, attempts, metrics FROM training_runs WHERE id = %(id)s", {"id": self.run_id}
            ).one()
            versions = tuple(
                conn.exec_driver_sql(
                    "SELECT id, status FROM model_versions WHERE training_run_id = %(id)s ORDER BY id",
                    {"id": self.run_id},
                ).all()
            )
        return status, progress, attempts, versions, metrics or {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, progress, attempts, versions, metrics = self.snapshot()
            except Exception as exc:  # keep watching; a failed poll is not a finding
                self.seen.append((time.monotonic(), f"poll failed: {exc}", 0.0, 0, ()))
            else:
                self.seen.append((time.monotonic(), status, progress, attempts, versions))
                usable = [v for v in versions if v[1] in ("ready", "promoted")]
                if usable and status != "succeeded":
                    self.early.append(f"run {status} at {progress:.2f} while model {usable} was usable")
                self.last_metrics = metrics
            self.stop.wait(0.2)
        self.engine.dispose()


def subscribe_to_registrations(url: str) -> None:
    """A webhook on `model_version.registered`: each registration leaves one delivery row (never sent here),
    so the number of rows counts how many times a model was released."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.models import Webhook

    engine = create_engine(url)
    with Session(engine) as db:
        db.add(Webhook(url="http://127.0.0.1:9/never-sent", secret="bench", events=["model_version.registered"]))
        db.commit()
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demonstrations", type=int, default=400, help="seeded demonstrations to train on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--kill-at", type=float, default=0.3, help="kill once the run's progress reaches this (and a checkpoint exists)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with the logs")
    parser.add_argument("--quick", action="store_true", help="300 demonstrations, 2 epochs, kill at 25 %%")
    args = parser.parse_args()
    if args.quick:
        # Enough steps (≈ 75) that the kill lands mid-run on an idle machine too: 100 demonstrations for one epoch
        # (13 steps) trained in under a second and finished before the watcher saw 25 %.
        args.demonstrations, args.epochs, args.kill_at = 300, 2, 0.25
    import httpx

    params = {
        "epochs": args.epochs,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "checkpoint_every": 3,
        "early_stopping_patience": None,
        "device": "cpu",
    }
    summary: dict = {
        "scenario": "kill_celery_worker",
        "demonstrations": args.demonstrations,
        "params": params,
        "load_avg_1m": [load_avg()],
    }
    with Stack(
        workers=1,
        prompts=args.demonstrations + 50,
        identities=4,
        overlap=1,
        redis=True,
        demonstrations_done=args.demonstrations,
        keep=args.keep,
    ) as stack:
        env = dict(os.environ, **stack.env, INSTRUCTLOOP_RUN_STALE_AFTER_S=str(STALE_AFTER_S))
        subscribe_to_registrations(stack.url)
        worker = start_celery_worker(env, stack.dir / "worker-1.log", stack.redis.url)
        watcher = None
        try:
            api = httpx.Client(
                base_url=stack.base, headers={"Authorization": f"Bearer {stack.seeded.admin_token}"}, timeout=30
            )
            created = api.post("/api/v1/runs", json={"kind": "sft", "params": params})
            if created.status_code != 201:
                raise RuntimeError(f"POST /api/v1/runs answered {created.status_code}: {created.text}")
            run_id = created.json()["id"]
            watcher = Watcher(stack.url, run_id)
            watcher.start()
            checkpoint = stack.dir / "data" / "artifacts" / "runs" / str(run_id) / "checkpoint" / "checkpoint.pt"
            started = time.monotonic()
            wait_until(
                lambda: watcher.seen and watcher.seen[-1][1] == "running",
                timeout=120,
                interval=0.1,
                message="the first worker to claim the run",
            )
            standby = start_celery_worker(env, stack.dir / "worker-2.log", stack.redis.url, wait=False)

            def ready_to_kill() -> bool:
                status, progress = watcher.seen[-1][1], watcher.seen[-1][2]
                if status in ("succeeded", "failed", "cancelled"):
                    raise RuntimeError(
                        f"the run ended ({status}) before it reached {args.kill_at:.0%}: "
                        "give it more --demonstrations or --epochs so the kill lands mid-run"
                    )
                return status == "running" and progress >= args.kill_at and checkpoint.exists()

            wait_until(
                ready_to_kill,
                timeout=300,
                interval=0.1,
                message=f"the SFT run to reach {args.kill_at:.0%} with a checkpoint",
            )
            killed_at, progress_at_kill = time.monotonic(), watcher.seen[-1][2]
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            worker = standby
            summary["killed_at_progress"] = round(progress_at_kill, 3)
            summary["killed_after_s"] = round(killed_at - started, 2)
            time.sleep(1.0)
            status_after_kill = watcher.snapshot()[0]
            summary["status_after_kill"] = status_after_kill
            from app.outbox import sender

            sender.cache_clear()

            def reaped_and_taken() -> bool:
                status, _, attempts, _, _ = watcher.snapshot()
                if (status == "running" and attempts >= 2) or status in ("succeeded", "failed"):
                    return True
                sender().send_task("instructloop.reap_stale_runs")  # what beat sends every 60 s
                return False

            wait_until(reaped_and_taken, timeout=120, interval=2.0, message="the reaper to re-queue the run")
            summary["requeued_after_kill_s"] = round(time.monotonic() - killed_at, 2)
            wait_until(
                lambda: watcher.snapshot()[0] in ("succeeded", "failed", "cancelled"),
                timeout=600,
                interval=0.5,
                message="the resumed run to finish",
            )
            summary["finished_after_kill_s"] = round(time.monotonic() - killed_at, 2)
            time.sleep(0.5)
        finally:
            if watcher is not None:
                watcher.stop.set()
                watcher.join()
            stop_server(worker)
        status, _progress, attempts, versions, metrics = watcher.snapshot()
        from sqlalchemy import create_engine

        engine = create_engine(stack.url)
        with engine.connect() as conn:
            registered = conn.exec_driver_sql(
                "SELECT count(*) FROM webhook_deliveries WHERE event = 'model_version.registered'"
            ).scalar()
            artifact = conn.exec_driver_sql(
                "SELECT artifact_path FROM model_versions WHERE training_run_id = %(id)s", {"id": run_id}
            ).scalar()
        engine.dispose()
        curve = (metrics or {}).get("curve") or []
        files = sorted(p.name for p in Path(artifact).iterdir()) if artifact and Path(artifact).is_dir() else []
        summary.update(
            run={
                "id": run_id,
                "status": status,
                "attempts": attempts,
                "steps": metrics.get("steps"),
                "epochs_run": metrics.get("epochs_run"),
            },
            versions=[list(v) for v in versions],
            registered_events=registered,
            resumed_from_step=(curve[0]["step"] - 1) if curve else None,
            model_files=files,
            states_seen=sorted({s[1] for s in watcher.seen}),
            early_usable=watcher.early[:5],
        )
    summary["load_avg_1m"].append(load_avg())
    checks = {
        "killed_mid_run": summary.get("status_after_kill") == "running" and summary["killed_at_progress"] < 1.0,
        "succeeded_once": status == "succeeded" and attempts == 2,
        "one_model_version": len(versions) == 1 and versions[0][1] in ("ready", "promoted"),
        "one_registered_event": registered == 1,
        "never_usable_before_success": not watcher.early,
        "model_files_complete": {"config.json", "model.safetensors"} <= set(files),
    }
    return emit({**summary, "checks": checks, "ok": all(checks.values())})


if __name__ == "__main__":
    sys.exit(main())
