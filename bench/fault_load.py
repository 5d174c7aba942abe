"""Fault scenario: 200 simulated labelers for 10 minutes against PostgreSQL and several uvicorn workers.

The property: under sustained load from many people at once, the server
answers every request (zero 5xx, no dropped connections), and the books
balance (nothing acknowledged is lost, nothing is doubled, no task gets more
labels than its overlap). The labelers (bench/labelers.py) log in or use API
tokens, think, submit rankings and demonstrations, skip and abandon tasks; the
database is a private PostgreSQL cluster, so the machine's shared server is
left alone.

    .venv/bin/python bench/fault_load.py            # 200 labelers thinking 5-25 s, 600 s, 3 workers
    .venv/bin/python bench/fault_load.py --quick    # 40 labelers thinking 0.5-4 s, 30 s

The last line of stdout is one JSON object; the exit status is 1 when the property breaks.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, load_avg
from bench.labelers import Stack, behaviour_from, load_parser, run_load, sizing


def database_activity(url: str, db_name: str) -> dict:
    """Backends of the benchmark database by state, how many wait on a lock, and the longest running statement."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT count(*) FILTER (WHERE state = 'active'), count(*) FILTER (WHERE wait_event_type = 'Lock'),"
                " count(*) FILTER (WHERE state = 'idle in transaction'), count(*),"
                " coalesce(extract(epoch FROM max(now() - query_start) FILTER (WHERE state = 'active')), 0)"
                " FROM pg_stat_activity WHERE datname = %(db)s AND pid <> pg_backend_pid()",
                {"db": db_name},
            ).one()
            # What the waiting statements wait for: which table's rows, and the statements themselves.
            waits = conn.exec_driver_sql(
                "SELECT coalesce(l.relation::regclass::text, l.locktype), left(a.query, 60), count(*)"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted AND a.datname = %(db)s"
                " GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 3",
                {"db": db_name},
            ).all()
    finally:
        engine.dispose()
    return {
        "active": row[0],
        "lock_waits": row[1],
        "idle_in_transaction": row[2],
        "connections": row[3],
        "longest_s": round(float(row[4]), 2),
        "waiting_for": [list(w) for w in waits],
    }


def main() -> int:
    parser = load_parser(__doc__, clients=200, seconds=600.0, workers=3)
    parser.add_argument("--quick", action="store_true", help="40 labelers for 30 s, thinking 0.5-4 s")
    parser.set_defaults(think=None)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds = 40, 30.0
    # 200 people thinking 5-25 s per task offer about 13 tasks/s: what two shared cores carry (see
    # ## labeling in bench/RESULTS.md for the capacity). The short run thinks faster to get work done in 30 s.
    args.think = args.think or ("0.5,4" if args.quick else "5,25")
    behaviour = behaviour_from(args)
    prompts, identities = sizing(args.clients, args.seconds, behaviour, args.overlap)
    samples: list[dict] = []
    with Stack(
        workers=args.workers,
        prompts=prompts,
        identities=identities,
        overlap=args.overlap,
        pg_admin_url=args.pg_admin_url,
        keep=args.keep,
    ) as stack:
        started = time.monotonic()

        async def watch() -> dict:
            # What the database was doing, every 5 s: if requests stall, this says whether on locks or CPU.
            while time.monotonic() - started < args.seconds:
                samples.append(
                    await asyncio.to_thread(database_activity, stack.url, stack.db_name)
                    | {"t": round(time.monotonic() - started), "load": load_avg()}
                )
                await asyncio.sleep(5)
            return {}

        result, logs = run_load(stack, args.clients, args.seconds, behaviour, during=watch)
    failures = Counter(int((t - started) // 30) * 30 for log in logs for t, _ in log.failures)
    result["failures_per_30s"] = {f"{t}s": n for t, n in sorted(failures.items())}
    result["database_worst"] = max(samples, key=lambda s: (s["lock_waits"], s["longest_s"]), default=None)
    result["database_busiest"] = max(samples, key=lambda s: s["active"], default=None)
    checks = {
        "zero_5xx": result["5xx"] == 0,
        "zero_dropped": result["no_answer"] == 0,
        "nothing_given_up": result["gave_up"] == result["requests_given_up"] == 0,
        "books_balance": result["books"]["ok"],
    }
    return emit({"scenario": "load", **result, "checks": checks, "ok": all(checks.values())})


if __name__ == "__main__":
    sys.exit(main())
