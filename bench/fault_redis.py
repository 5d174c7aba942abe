"""Fault scenario: Redis (the Celery broker) goes away for 60 s while simulated labelers work.

Labeling must not need Redis: leases, drafts, submissions, skips and logins
only touch PostgreSQL, so the labelers must see no error at all. A job
requested meanwhile (an admin starts an SFT run through POST /api/v1/runs) is
stored as a `training_runs` row whose broker message cannot be sent; it waits
in the outbox (app/jobs.py) and runs once Redis is back: beat's
`dispatch_pending_runs` (every 15 s) sends it, and the real Celery worker,
which reconnects by itself, trains it. Redis here is a private redis-server
(killed with SIGKILL, then started empty on the same port), never the
machine's shared one.

The property: zero 5xx and no dropped connection for the labelers, nothing
lost or doubled, the run requested during the outage answered 201, was not
sent while Redis was down, and ran exactly once after it returned (recovery
time: from Redis back to the run finished).

    .venv/bin/python bench/fault_redis.py            # 60 labelers, 120 s, Redis down 60 s
    .venv/bin/python bench/fault_redis.py --quick    # 20 labelers, 25 s, Redis down 10 s

The last line of stdout is one JSON object; the exit status is 1 when the property breaks.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, emit, start_celery_worker, stop_server, wait_until
from bench.labelers import Stack, behaviour_from, load_parser, run_load, sizing


def run_row(url: str, run_id: int) -> dict:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.connect() as conn:
        row = (
            conn.exec_driver_sql(
                "SELECT status, attempts, enqueued_at, started_at, finished_at, error FROM training_runs "
                "WHERE id = %(id)s",
                {"id": run_id},
            )
            .mappings()
            .one()
        )
    engine.dispose()
    return dict(row)


def _after(moment: datetime | None, since: datetime | None) -> float | None:
    return round((moment - since).total_seconds(), 2) if moment and since else None


def main() -> int:
    parser = load_parser(__doc__, clients=60, seconds=120.0, workers=2)
    parser.add_argument("--down", type=float, default=60.0, help="seconds Redis stays down")
    parser.add_argument("--quick", action="store_true", help="20 labelers for 25 s, Redis down 10 s")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.down = 20, 25.0, 10.0
    if args.down > args.seconds * 0.8:
        parser.error("--down: the outage must end before the labelers stop (at most 80 % of --seconds)")
    import httpx

    behaviour = behaviour_from(args)
    prompts, identities = sizing(args.clients, args.seconds, behaviour, args.overlap)
    outage: dict = {}
    with Stack(
        workers=args.workers,
        prompts=prompts,
        identities=identities,
        overlap=args.overlap,
        redis=True,
        demonstrations_done=40,
        pg_admin_url=args.pg_admin_url,
        keep=args.keep,
    ) as stack:
        env = dict(os.environ, **stack.env)
        worker = start_celery_worker(env, stack.dir / "worker.log", stack.redis.url)
        with open(stack.dir / "beat.log", "ab") as beat_log:
            beat = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "beat"],
                cwd=ROOT,
                env=env,
                stdout=beat_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:

            async def outage_with_a_job() -> dict:
                await asyncio.sleep(args.seconds * 0.1)
                stack.redis.stop()
                outage["down_at"] = time.monotonic()
                await asyncio.sleep(2.0)
                async with httpx.AsyncClient(
                    base_url=stack.base, timeout=30, headers={"Authorization": f"Bearer {stack.seeded.admin_token}"}
                ) as admin:
                    t0 = time.perf_counter()
                    created = await admin.post(
                        "/api/v1/runs",
                        json={"kind": "sft", "params": {"epochs": 1, "learning_rate": 1e-3, "device": "cpu"}},
                    )
                    outage["request_ms"] = round((time.perf_counter() - t0) * 1000, 1)
                outage["request_status"] = created.status_code
                outage["run_id"] = created.json().get("id") if created.status_code == 201 else None
                if outage["run_id"]:
                    outage["while_down"] = run_row(stack.url, outage["run_id"])
                await asyncio.sleep(max(0.0, args.down - (time.monotonic() - outage["down_at"])))
                await asyncio.to_thread(stack.redis.start)
                outage["back_at"], outage["back_wall"] = time.monotonic(), datetime.now(UTC)
                return {}

            result, _ = run_load(stack, args.clients, args.seconds, behaviour, during=outage_with_a_job)
            run = None
            if outage.get("run_id"):
                try:
                    wait_until(
                        lambda: run_row(stack.url, outage["run_id"])["status"] in ("succeeded", "failed"),
                        timeout=300,
                        interval=0.5,
                        message="the run requested during the outage",
                    )
                    outage["finished_after_back_s"] = round(time.monotonic() - outage["back_at"], 2)
                except TimeoutError as exc:
                    outage["error"] = str(exc)
                run = run_row(stack.url, outage["run_id"])
        finally:
            stop_server(beat)
            stop_server(worker)
    while_down = outage.get("while_down") or {}
    result["outage"] = {
        "down_s": round(outage["back_at"] - outage["down_at"], 2) if "back_at" in outage else None,
        "job_request_status": outage.get("request_status"),
        "job_request_ms": outage.get("request_ms"),
        "run_while_down": {k: while_down.get(k) for k in ("status", "enqueued_at")},
        "run_after": run and {k: run[k] for k in ("status", "attempts", "error")},
        # Beat's dispatch (every 15 s) sends it; then the worker claims and trains it.
        "run_sent_after_redis_back_s": _after(run and run["enqueued_at"], outage.get("back_wall")),
        "run_started_after_redis_back_s": _after(run and run["started_at"], outage.get("back_wall")),
        "run_finished_after_redis_back_s": outage.get("finished_after_back_s"),
        "error": outage.get("error"),
    }
    checks = {
        "labeling_without_errors": result["5xx"] == 0 and result["no_answer"] == 0 and result["gave_up"] == 0,
        "books_balance": result["books"]["ok"],
        "job_accepted_while_down": outage.get("request_status") == 201,
        "job_held_in_outbox": while_down.get("status") == "queued" and while_down.get("enqueued_at") is None,
        "job_ran_once_after": bool(run)
        and run["status"] == "succeeded"
        and run["attempts"] == 1
        and run["started_at"] is not None
        and while_down.get("status") == "queued",
    }
    return emit({"scenario": "redis_outage", **result, "checks": checks, "ok": all(checks.values())})


if __name__ == "__main__":
    sys.exit(main())
