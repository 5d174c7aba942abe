"""Fault scenario: kill -9 a web worker process while simulated labelers work.

`python -m app.cli serve --workers N` runs N uvicorn worker processes under a
supervisor. During the load one worker (and later another, --kills) gets
SIGKILL: its in-flight requests die with their connections, and a transaction
it had open is rolled back by PostgreSQL. The clients retry the same request
(the same assignment, the same body); the supervisor starts a new worker. The
property: nothing acknowledged is lost, nothing is doubled, no request gets a
500, and no client gives up.

    .venv/bin/python bench/fault_web_worker.py            # 60 labelers, 120 s, 3 workers, 3 kills
    .venv/bin/python bench/fault_web_worker.py --quick    # 30 labelers, 25 s, 2 kills

The last line of stdout is one JSON object; the exit status is 1 when the property breaks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import child_pids, emit
from bench.labelers import Stack, behaviour_from, failure_window, load_parser, run_load, sizing


def main() -> int:
    parser = load_parser(__doc__, clients=60, seconds=120.0, workers=3)
    parser.add_argument("--kills", type=int, default=3, help="how many times a worker is killed")
    parser.add_argument("--quick", action="store_true", help="30 labelers for 25 s, 2 kills")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.kills = 30, 25.0, 2
    behaviour = behaviour_from(args)
    prompts, identities = sizing(args.clients, args.seconds, behaviour, args.overlap)
    kills: list[dict] = []
    first_kill = [0.0]

    with Stack(
        workers=args.workers,
        prompts=prompts,
        identities=identities,
        overlap=args.overlap,
        pg_admin_url=args.pg_admin_url,
        keep=args.keep,
    ) as stack:

        async def killer() -> dict:
            # Kills spread over the middle of the run, each once the previous replacement is serving.
            for n in range(args.kills):
                await asyncio.sleep(args.seconds * 0.7 / (args.kills + 1))
                before = child_pids(stack.server)
                victim = before[n % len(before)]
                at = time.monotonic()
                first_kill[0] = first_kill[0] or at
                os.kill(victim, signal.SIGKILL)
                while True:  # the supervisor notices the dead child and starts another
                    now = child_pids(stack.server)
                    if len(now) == len(before) and victim not in now:
                        break
                    if time.monotonic() - at > 60:
                        return {"kills": kills, "error": f"no replacement for worker {victim} within 60 s"}
                    await asyncio.sleep(0.1)
                kills.append({"pid": victim, "replaced_after_s": round(time.monotonic() - at, 2)})
            return {"kills": kills}

        result, logs = run_load(stack, args.clients, args.seconds, behaviour, during=killer)
        alive = child_pids(stack.server)
    result["after_first_kill"] = failure_window(logs, first_kill[0]) if first_kill[0] else None
    checks = {
        "killed": len(kills) == args.kills and "error" not in result,
        "workers_replaced": len(alive) == args.workers,
        "no_500": result["500"] == 0,
        "nothing_given_up": result["gave_up"] == result["requests_given_up"] == 0,
        "books_balance": result["books"]["ok"],
    }
    return emit({"scenario": "kill_web_worker", **result, "checks": checks, "ok": all(checks.values())})


if __name__ == "__main__":
    sys.exit(main())
