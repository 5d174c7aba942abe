"""Benchmark of the export API: comparison rows per second over HTTP and the server's peak memory.

Builds a throwaway PostgreSQL database (`instructloop_bench_export`, dropped
at the end), bulk-loads rankings with COPY (K = 4..9, some ties) in two
batches, one of about --small-rows comparison rows and one of about --rows,
then streams `GET /api/v1/export/comparisons?batch=...` from a fresh uvicorn
subprocess per batch while sampling the server's RSS. Baselines measured in
the same run: the raw database read of the same item rows (server-side
cursor, rows discarded) and the export service in-process without HTTP.

    .venv/bin/python bench/export.py            # 1,000,000 rows
    .venv/bin/python bench/export.py --quick    # 50,000 rows, a smoke run

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DB_NAME = "instructloop_bench_export"
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="comparison rows in the large export")
    parser.add_argument("--small-rows", type=int, default=10_000, help="comparison rows in the small export")
    parser.add_argument("--quick", action="store_true", help="a small run: 50,000 and 5,000 rows, no extra formats")
    parser.add_argument(
        "--extra-formats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time CSV and gzip transfer on the large export",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("INSTRUCTLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create databases",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="downloads of each JSON Lines export; the machine is shared, so best and median are kept",
    )
    parser.add_argument("--keep-db", action="store_true", help="do not drop the benchmark database")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.small_rows, args.extra_formats = 50_000, 5_000, False
    return args


# --- data ---------------------------------------------------------------------------------------


def make_ranks(rng: random.Random, k: int) -> list[int]:
    """A best-first order of K outputs where about a third of rankings have one tie."""
    ranks = list(range(1, k + 1))
    if rng.random() < 0.33:
        tie = rng.randrange(1, k)
        ranks = [r if r <= tie else r - 1 for r in ranks]
    rng.shuffle(ranks)
    return ranks


def load(url: str, small_rows: int, large_rows: int, seed: int) -> dict:
    """Creates users, versions and two batches of rankings; returns counts and a token."""
    import psycopg
    from sqlalchemy.orm import Session

    from app.db import make_engine
    from app.export.rows import comparison_pairs
    from app.models import ModelVersion, PromptBatch, User
    from app.security import create_api_token

    engine = make_engine(url)
    with Session(engine) as db:
        admin = User(username="bench-admin", role="admin", password_hash="x")
        labelers = [
            User(username=f"bench-labeler-{i}", role="labeler", password_hash="x", held_out=i % 10 == 0)
            for i in range(40)
        ]
        versions = [ModelVersion(name=f"policy-{i}", kind="policy", status="ready") for i in range(3)]
        batches = [PromptBatch(name="bench-small", k=4), PromptBatch(name="bench-large", k=4)]
        db.add_all([admin, *labelers, *versions, *batches])
        db.flush()
        token, _ = create_api_token(db, admin, ["export:read"])
        db.commit()
        labeler_ids, version_ids = [u.id for u in labelers], [v.id for v in versions]
        batch_ids = [b.id for b in batches]
    engine.dispose()

    rng = random.Random(seed)
    at = T0
    ids = {"prompt": 0, "completion": 0, "item": 0}
    prompts, completions, tasks, assignments, rankings, items = [], [], [], [], [], []
    pairs_per_batch = []
    for batch_id, target in zip(batch_ids, (small_rows, large_rows), strict=True):
        pairs = 0
        while pairs < target:
            ids["prompt"] += 1
            pid = ids["prompt"]
            numbers = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
            split = "train" if pid % 10 < 8 else ("valid" if pid % 10 == 8 else "test")
            prompts.append(
                (
                    pid,
                    batch_id,
                    f"Sort these numbers ascending: {' '.join(map(str, numbers))}",
                    "plain",
                    split,
                    f"{pid:064x}",
                    "{}",
                    "[]",
                    at,
                )
            )
            k = rng.randint(4, 9)
            tasks.append((pid, batch_id, pid, "ranking", k, 1, 1, False, 0, False, at))
            labeler = rng.choice(labeler_ids)
            assignments.append((pid, pid, labeler, "submitted", at, at + timedelta(minutes=20), at, "{}", "[]", 30.0))
            at += timedelta(seconds=1)
            rankings.append((pid, pid, pid, pid, labeler, rng.random() < 0.02, False, 30.0, at))
            ranks = make_ranks(rng, k)
            pairs += len(comparison_pairs(tuple(sorted(ranks))))
            for position, rank in enumerate(ranks):
                ids["completion"] += 1
                cid = ids["completion"]
                answer = sorted(numbers) if rng.random() < 0.6 else rng.sample(numbers, len(numbers))
                completions.append((cid, pid, " ".join(map(str, answer)), rng.choice(version_ids), "{}", at))
                ids["item"] += 1
                items.append((ids["item"], pid, cid, rank, rng.randint(1, 7), "[]", position))
        pairs_per_batch.append(pairs)

    tables = [
        ("prompts", "id, batch_id, text, category, split, normalized_key, metadata, pii_flags, created_at", prompts),
        (
            "tasks",
            "id, batch_id, prompt_id, kind, k, needed, done_count, is_open, priority, is_gold, created_at",
            tasks,
        ),
        ("completions", "id, prompt_id, text, model_version_id, sampling, created_at", completions),
        (
            "assignments",
            "id, task_id, labeler_id, state, leased_at, expires_at, finished_at, draft, display_order, active_seconds",
            assignments,
        ),
        (
            "rankings",
            "id, assignment_id, task_id, prompt_id, labeler_id, all_unacceptable, is_gold, active_seconds, created_at",
            rankings,
        ),
        ("ranking_items", "id, ranking_id, completion_id, rank, likert, flags, position", items),
    ]
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        with conn.cursor() as cur:
            for table, columns, rows in tables:
                with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {len(rows)})")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return {
        "token": token,
        "small_rows": pairs_per_batch[0],
        "large_rows": pairs_per_batch[1],
        "rankings": len(rankings),
        "ranking_items": len(items),
    }


# --- measuring ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A fresh uvicorn serving the app on the benchmark database, with its RSS sampled."""

    def __init__(self, url: str):
        import httpx

        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="instructloop-bench-export-")
        env = dict(
            os.environ,
            INSTRUCTLOOP_DATABASE_URL=url,
            INSTRUCTLOOP_ENVIRONMENT="test",
            INSTRUCTLOOP_SECRET_KEY="bench-secret",
            INSTRUCTLOOP_DATA_DIR=self.data_dir,
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise TimeoutError("server did not start")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def stream(server: Server, token: str, params: dict, accept_encoding: str = "identity") -> dict:
    """Downloads one export, counting rows, while sampling the server's RSS every 20 ms."""
    import httpx

    peak = [server.rss_mb()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = nbytes = 0
    started = time.perf_counter()
    headers = {"authorization": f"Bearer {token}", "accept-encoding": accept_encoding}
    with httpx.stream(
        "GET", f"{server.base}/api/v1/export/comparisons", params=params, headers=headers, timeout=600
    ) as response:
        response.raise_for_status()
        chunks = response.iter_bytes(1 << 20) if accept_encoding != "identity" else response.iter_raw(1 << 20)
        for chunk in chunks:
            rows += chunk.count(b"\n")
            nbytes += len(chunk)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if params.get("format") == "csv":
        rows -= 1  # the header row
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "mb_per_s": round(nbytes / seconds / 2**20, 1),
        "peak_rss_mb": round(peak[0], 1),
    }


def raw_fetch(url: str, batch: str) -> dict:
    """Baseline: reads the export's ranking and item rows from the database and builds no output."""
    from app.db import make_engine
    from app.export.stream import SnapshotExport, _units

    engine = make_engine(url)
    export = SnapshotExport(engine, "comparisons", secret_key="bench-secret", batch=batch)
    started = time.perf_counter()
    items = sum(len(rows) for _, rows in _units(export.conn, "comparisons", export.filters, None))
    seconds = time.perf_counter() - started
    export.close()
    engine.dispose()
    return {"item_rows": items, "seconds": round(seconds, 3)}


def in_process(url: str, batch: str) -> dict:
    """Baseline: the export service without HTTP, in this process."""
    from app.db import make_engine
    from app.export.stream import SnapshotExport

    engine = make_engine(url)
    started = time.perf_counter()
    rows = sum(
        chunk.count(b"\n")
        for chunk in SnapshotExport(engine, "comparisons", secret_key="bench-secret", batch=batch).chunks()
    )
    seconds = time.perf_counter() - started
    engine.dispose()
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}


def main() -> None:
    args = parse_args()
    from app import loop

    loop.wire()  # the services run in this process: wire the stages' reactions
    from alembic import command
    from sqlalchemy import create_engine, text

    from app.db import alembic_config

    url = args.pg_admin_url.rsplit("/", 1)[0] + f"/{DB_NAME}"
    admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{DB_NAME}"'))
    try:
        command.upgrade(alembic_config(url), "head")
        started = time.perf_counter()
        data = load(url, args.small_rows, args.rows, args.seed)
        print(
            f"loaded {data['rankings']:,} rankings ({data['ranking_items']:,} items) in "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        result = {
            "benchmark": "export",
            "machine_cpus": os.cpu_count(),
            "rankings": data["rankings"],
            "ranking_items": data["ranking_items"],
            "load_average_start": round(os.getloadavg()[0], 2),
        }
        raw = raw_fetch(url, "bench-large")
        result["baseline_raw_fetch"] = raw | {"comparison_rows_per_s": round(data["large_rows"] / raw["seconds"])}
        result["baseline_in_process"] = in_process(url, "bench-large")
        for label, batch, expected in (
            ("small", "bench-small", data["small_rows"]),
            ("large", "bench-large", data["large_rows"]),
        ):
            server = Server(url)
            try:
                idle = server.rss_mb()
                runs = [stream(server, data["token"], {"batch": batch}) for _ in range(args.repeats)]
                assert all(run["rows"] == expected for run in runs), ([run["rows"] for run in runs], expected)
                rates = sorted(run["rows_per_s"] for run in runs)
                result[label] = {
                    "rows": expected,
                    "rows_per_s_best": rates[-1],
                    "rows_per_s_median": rates[len(rates) // 2],
                    "runs_rows_per_s": [run["rows_per_s"] for run in runs],
                    "mb_per_s_best": max(run["mb_per_s"] for run in runs),
                    "idle_rss_mb": round(idle, 1),
                    "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                }
                if label == "large" and args.extra_formats:
                    result["large_csv"] = stream(server, data["token"], {"batch": batch, "format": "csv"})
                    result["large_gzip_transfer"] = stream(server, data["token"], {"batch": batch}, "gzip")
            finally:
                server.stop()
            print(f"{label}: {result[label]}", file=sys.stderr)
        large, small = result["large"], result["small"]
        result["rss_growth_small_to_large_mb"] = round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)
        result["http_vs_in_process"] = round(large["rows_per_s_best"] / result["baseline_in_process"]["rows_per_s"], 2)
        result["http_vs_raw_fetch"] = round(
            large["rows_per_s_best"] / result["baseline_raw_fetch"]["comparison_rows_per_s"], 2
        )
        result["load_average_end"] = round(os.getloadavg()[0], 2)
    finally:
        if not args.keep_db:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
