"""Fault scenario: stop PostgreSQL for a few seconds while simulated labelers work, then start it again.

The web must recover by itself: the connections in its pools died with the
old server and are detected (`pool_pre_ping` in app/db.py) instead of being
handed to requests, and while the database is away requests are answered
503 with Retry-After (app/main.py), never 500, so clients know to retry.
The clients retry the same request; the property: no 500, nothing
acknowledged lost, nothing doubled, no client gives up, and requests succeed
again soon after the database is back (recovery time: from `pg_ctl start`
returning to the last failed request; also to the first good answer). The
cluster is private (initdb into a temporary directory): the machine's shared
PostgreSQL is never touched.

    .venv/bin/python bench/fault_postgres.py            # 60 labelers, 120 s, down 10 s, 2 restarts
    .venv/bin/python bench/fault_postgres.py --quick    # 30 labelers, 25 s, down 3 s, 1 restart

The last line of stdout is one JSON object; the exit status is 1 when the property breaks.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit
from bench.labelers import Stack, behaviour_from, load_parser, run_load, sizing

RECOVERY_LIMIT_S = 15.0  # after the database is back, failures must stop within this time


def main() -> int:
    parser = load_parser(__doc__, clients=60, seconds=120.0, workers=3)
    parser.add_argument("--down", type=float, default=10.0, help="seconds the database stays stopped")
    parser.add_argument("--restarts", type=int, default=2, help="how many times it is stopped and started")
    parser.add_argument("--quick", action="store_true", help="30 labelers for 25 s, down 3 s, 1 restart")
    args = parser.parse_args()
    if args.pg_admin_url:
        parser.error("--pg-admin-url: this scenario stops its database, so it always runs a private cluster")
    if args.quick:
        args.clients, args.seconds, args.down, args.restarts = 30, 25.0, 3.0, 1
    behaviour = behaviour_from(args)
    prompts, identities = sizing(args.clients, args.seconds, behaviour, args.overlap)
    outages: list[dict] = []

    with Stack(
        workers=args.workers, prompts=prompts, identities=identities, overlap=args.overlap, keep=args.keep
    ) as stack:

        async def restarter() -> dict:
            for _ in range(args.restarts):
                await asyncio.sleep(args.seconds * 0.6 / args.restarts)
                stopped = time.monotonic()
                await asyncio.to_thread(stack.pg.stop, "fast")
                await asyncio.sleep(args.down)
                await asyncio.to_thread(stack.pg.start)
                outages.append({"stopped_at": stopped, "back_at": time.monotonic()})
            return {}

        result, logs = run_load(stack, args.clients, args.seconds, behaviour, during=restarter)
    for n, outage in enumerate(outages):
        until = outages[n + 1]["stopped_at"] if n + 1 < len(outages) else float("inf")
        during = [t for log in logs for t, _ in log.failures if outage["stopped_at"] <= t < until]
        after_back = [t for t in during if t >= outage["back_at"]]
        answered = [t for log in logs for t in log.answered_at if t >= outage["back_at"]]
        outage.update(
            down_s=round(outage["back_at"] - outage["stopped_at"], 2),
            failures=len(during),
            recovery_s=round(max(after_back) - outage["back_at"], 2) if after_back else 0.0,
            first_answer_after_back_s=round(min(answered) - outage["back_at"], 2) if answered else None,
        )
    result["outages"] = [{k: v for k, v in o.items() if k not in ("stopped_at", "back_at")} for o in outages]
    checks = {
        "restarted": len(outages) == args.restarts,
        "no_500": result["500"] == 0,
        "only_503": all(kind.endswith(" 503") for kind in result["5xx_by_kind"]),
        "recovered": all(o["recovery_s"] <= RECOVERY_LIMIT_S for o in outages),
        "nothing_given_up": result["gave_up"] == result["requests_given_up"] == 0,
        "books_balance": result["books"]["ok"],
    }
    return emit({"scenario": "restart_postgres", **result, "checks": checks, "ok": all(checks.values())})


if __name__ == "__main__":
    sys.exit(main())
