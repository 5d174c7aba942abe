"""Labeling benchmark: simulated labelers lease and submit K=6 rankings through the real HTTP API.

Builds a throwaway PostgreSQL database (`instructloop_bench_labeling_<random>`,
dropped at the end), migrates it with Alembic and bulk-loads a batch in
`labeling` that already holds --rankings submitted rankings (users, prompts,
K=6 completions each, tasks and task items, assignments, rankings and ranking
items, all with `INSERT ... SELECT generate_series`) plus --open-tasks ranking
tasks still to label. Then, for each uvicorn worker count in --workers, it
starts `python -m app.cli serve --workers N` and runs 1, 8 and 32 concurrent
labelers (httpx on asyncio, only to 127.0.0.1), each with its own bearer token
of scope `label`, looping `GET /api/v1/tasks/next?kind=ranking` then
`POST /api/v1/assignments/{id}/submit`, for --seconds per level after a short
warm-up. It reports submissions/s, p50/p95/p99 of the lease and of the submit,
every non-2xx answer, and the CPU each submission cost the server, its
PostgreSQL backends and the clients (psutil; the machine is shared, so CPU per
submission is steadier than throughput), and checks the books at the end (one
ranking per submit, no task over its `overlap`). Baseline, measured in the same
run on the same server: `GET /healthz` (one `SELECT 1` through the same stack)
at the highest concurrency, so a submission (two requests) can be read against
two bare requests. `--explain` prints EXPLAIN ANALYZE of the lease query.

    .venv/bin/python bench/labeling.py            # 100,000 existing rankings, workers 1, 2 and 4
    .venv/bin/python bench/labeling.py --quick    # 10,000 rankings, 2 workers, 4 s per level

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import create_database, drop_database, percentile, start_server, stop_server  # noqa: E402

K = 6
HISTORY_LABELERS = 500  # who wrote the existing rankings; the clients are the first of them


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rankings", type=int, default=100_000, help="submitted rankings loaded before the run")
    parser.add_argument("--open-tasks", type=int, default=60_000, help="open ranking tasks the clients can take")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated uvicorn worker counts to try")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument(
        "--max-submissions",
        type=int,
        default=20_000,
        help="stop a level after this many submissions (a bound besides --seconds)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run: 10,000 rankings, 2 workers, 4 s per level")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("INSTRUCTLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create databases",
    )
    parser.add_argument("--keep-db", action="store_true", help="do not drop the benchmark database")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the lease query after loading")
    parser.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="HTTP client of the simulated labelers: lean (asyncio streams, little CPU) or httpx",
    )
    args = parser.parse_args()
    if args.quick:
        args.rankings, args.open_tasks, args.workers, args.seconds, args.warmup = 10_000, 8_000, "2", 4.0, 1.0
    args.client_levels = [int(c) for c in args.clients.split(",") if c.strip()]
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if max(args.client_levels) > HISTORY_LABELERS:
        parser.error(f"--clients: at most {HISTORY_LABELERS} concurrent labelers")
    return args


# --- database -----------------------------------------------------------------------------------


# Bulk load: the ids of each row follow from the prompt number p (1..P) and output j (0..K-1), so the
# tables can be filled set-wise on the server without a round trip per row.
LOAD_SQL = [
    """INSERT INTO prompts (id, batch_id, text, messages, source_user_id, category, split, normalized_key,
                            prefix_key, metadata, pii_flags, created_at)
       SELECT p, %(batch)s, t, jsonb_build_array(jsonb_build_object('role', 'user', 'content', t)),
              'src-' || (p %% 5000), 'plain', 'train', md5(p::text) || md5((-p)::text), NULL,
              '{}'::jsonb, '[]'::jsonb, now() - interval '30 days'
       FROM (SELECT p, 'Sort these numbers from smallest to largest: ' || (p %% 97) || ', ' || (p %% 89)
                       || ', ' || (p %% 83) || ' (prompt ' || p || ')' AS t
             FROM generate_series(1, %(prompts)s) p) AS numbered""",
    """INSERT INTO completions (id, prompt_id, text, model_version_id, sampling, created_at)
       SELECT (p - 1) * 6 + j + 1, p, 'Answer ' || j || ' to prompt ' || p || ': ' || repeat('the numbers are ', 4 + j),
              %(model)s, '{"temperature": 1.0}'::jsonb, now() - interval '29 days'
       FROM generate_series(1, %(prompts)s) p, generate_series(0, 5) j""",
    """INSERT INTO tasks (id, batch_id, prompt_id, kind, k, needed, done_count, is_open, priority, is_gold, created_at)
       SELECT p, %(batch)s, p, 'ranking', 6, 1, CASE WHEN p <= %(done)s THEN 1 ELSE 0 END, p > %(done)s, 0, false,
              now() - interval '29 days'
       FROM generate_series(1, %(prompts)s) p""",
    """INSERT INTO task_items (id, task_id, completion_id, position)
       SELECT (p - 1) * 6 + j + 1, p, (p - 1) * 6 + j + 1, j
       FROM generate_series(1, %(prompts)s) p, generate_series(0, 5) j""",
    """INSERT INTO assignments (id, task_id, labeler_id, state, leased_at, expires_at, finished_at, draft,
                                display_order, active_seconds)
       SELECT p, p, %(first_user)s + (p %% %(labelers)s), 'submitted', t, t + interval '20 minutes',
              t + interval '1 minute', '{}'::jsonb,
              jsonb_build_array((p - 1) * 6 + 4, (p - 1) * 6 + 2, (p - 1) * 6 + 6, (p - 1) * 6 + 1,
                                (p - 1) * 6 + 5, (p - 1) * 6 + 3),
              30 + p %% 60
       FROM generate_series(1, %(done)s) p, LATERAL (SELECT now() - (%(done)s - p) * interval '10 seconds' AS t) s""",
    """INSERT INTO rankings (id, assignment_id, task_id, prompt_id, labeler_id, all_unacceptable, is_gold,
                             active_seconds, created_at)
       SELECT p, p, p, p, %(first_user)s + (p %% %(labelers)s), false, false, 30 + p %% 60,
              now() - (%(done)s - p) * interval '10 seconds'
       FROM generate_series(1, %(done)s) p""",
    """INSERT INTO ranking_items (id, ranking_id, completion_id, rank, likert, flags, position)
       SELECT (p - 1) * 6 + j + 1, p, (p - 1) * 6 + j + 1, 1 + (p + j) %% 5, 1 + (p + j) %% 7,
              CASE WHEN (p + j) %% 11 = 0 THEN '["hallucination"]'::jsonb ELSE '[]'::jsonb END, j
       FROM generate_series(1, %(done)s) p, generate_series(0, 5) j""",
]
TABLES_WITH_IDS = ("prompts", "completions", "tasks", "task_items", "assignments", "rankings", "ranking_items")


def load(url: str, rankings: int, open_tasks: int, clients: int) -> tuple[dict, list[str]]:
    """Fills the database; returns the load timings and one `label` token per client."""
    from sqlalchemy import create_engine

    from app.db import get_sessionmaker
    from app.models import ModelVersion, PromptBatch, User
    from app.security import create_api_token

    timings: dict[str, float] = {}
    start = time.perf_counter()
    with get_sessionmaker()() as db:
        users = [
            User(username=f"bench-labeler-{i}", role="labeler", password_hash="!") for i in range(HISTORY_LABELERS)
        ]
        model = ModelVersion(name="bench-base", kind="base", status="ready", artifact_path="/nonexistent")
        batch = PromptBatch(
            name="bench-labeling",
            status="labeling",
            k=K,
            overlap=1,
            wants_demonstrations=False,
            guidelines="Rank the outputs by **correctness**, then by concision.",
        )
        db.add_all([*users, model, batch])
        db.flush()
        tokens = [create_api_token(db, users[i], ["label"], name="bench")[0] for i in range(clients)]
        params = {
            "batch": batch.id,
            "model": model.id,
            "first_user": users[0].id,
            "labelers": HISTORY_LABELERS,
            "prompts": rankings + open_tasks,
            "done": rankings,
        }
        db.commit()
    engine = create_engine(url)
    with engine.begin() as conn:
        # The rows are consistent by construction: skip the per-row foreign-key triggers while loading
        # (superuser only; the constraints stay and hold for everything the benchmark itself writes).
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for sql in LOAD_SQL:
            table = sql.split()[2]
            t0 = time.perf_counter()
            conn.exec_driver_sql(sql, params)
            timings[table] = round(time.perf_counter() - t0, 2)
        for table in TABLES_WITH_IDS:
            conn.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"  # noqa: S608  constant names
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        t0 = time.perf_counter()
        conn.exec_driver_sql("VACUUM ANALYZE")
        timings["vacuum_analyze"] = round(time.perf_counter() - t0, 2)
    engine.dispose()
    timings["total"] = round(time.perf_counter() - start, 2)
    return timings, tokens


def explain_lease(url: str) -> str:
    """Returns EXPLAIN ANALYZE of the lease query for the first client, as the service builds it."""
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql

    from app.db import get_sessionmaker
    from app.labeling import leases
    from app.models import User

    captured: list[str] = []
    with get_sessionmaker()() as db:
        labeler = db.scalar(select(User).order_by(User.id).limit(1))
        original = leases._lock_free_slot

        def capture(session, query, *params):
            # `params`: the bound values, when the service builds the query once and binds them per call.
            bound = query.params(params[0]) if params else query
            compiled = bound.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
            captured.append(str(compiled))
            return original(session, query, *params)

        leases._lock_free_slot = capture
        try:
            leases.lease_next_task(db, labeler, "ranking")
        finally:
            leases._lock_free_slot = original
        if not captured:
            return "(the lease query did not run: the labeler already held a lease)"
        plan = db.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + captured[0]).scalars().all()
        db.rollback()
    return "\n".join(plan)


# --- clients --------------------------------------------------------------------------------------


class ClientError(Exception):
    """The connection failed or the server's answer could not be read."""


class LeanResponse:
    """The part of an httpx response the labelers read."""

    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self):
        return json.loads(self.content)


class LeanClient:
    """A minimal HTTP/1.1 client: one keep-alive connection, one request at a time, over asyncio streams.

    The clients share the two cores with the server they measure, and httpx cost 8-28 ms of CPU per
    submission (two requests) in this benchmark, as much as half the server's own; this one sends the same
    requests and reads the same answers (status line, then a Content-Length or chunked body) for about
    0.5 ms, so the machine's CPU goes to the server. It speaks only to our own uvicorn on 127.0.0.1.
    `--client httpx` runs the old clients.
    """

    def __init__(self, base: str, headers: dict[str, str] | None = None, timeout: float = 30.0):
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout = host, int(port or 80), timeout
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.fixed_headers = f"Host: {host}:{self.port}\r\n{extra}".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def get(self, path: str, params: dict[str, str] | None = None) -> LeanResponse:
        if params:
            path += "?" + "&".join(f"{key}={value}" for key, value in params.items())
        return await self.request("GET", path)

    async def post(self, path: str, json: object) -> LeanResponse:
        return await self.request("POST", path, _json_dumps(json).encode())

    async def request(self, method: str, path: str, body: bytes | None = None) -> LeanResponse:
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.fixed_headers
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        try:
            async with asyncio.timeout(self.timeout):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                self.writer.write(head + b"\r\n" + (body or b""))
                return await self._read_response()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            await self.aclose()
            raise ClientError(f"{type(exc).__name__}: {exc}") from exc

    async def _read_response(self) -> LeanResponse:
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            content = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            content = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                content += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")  # the empty trailer
        elif status in (204, 304) or 100 <= status < 200:
            content = b""
        else:
            raise ValueError(f"answer {status} without a length")
        if headers.get(b"connection", b"").lower() == b"close":
            await self.aclose()
        return LeanResponse(status, content)


def _json_dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def open_client(kind: str, base: str, headers: dict[str, str] | None = None):
    """Returns an async-context HTTP client with one keep-alive connection: `lean` (default) or `httpx`."""
    if kind == "lean":
        return LeanClient(base, headers)
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(base_url=base, headers=headers or {}, timeout=30.0, limits=limits)


def client_errors(kind: str) -> tuple[type[Exception], ...]:
    """The exceptions a client of that kind raises when a request fails (counted as errors, not crashes)."""
    if kind == "lean":
        return (ClientError,)
    import httpx

    return (httpx.HTTPError,)


@dataclass
class LevelStats:
    """What the clients of one concurrency level saw while it was measured."""

    lease_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    submissions: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    exhausted: int = 0
    submitted_ids: list[int] = field(default_factory=list)

    def error(self, what: str, status: int | str) -> None:
        key = f"{what} {status}"
        self.errors[key] = self.errors.get(key, 0) + 1


def ranking_items(completion_ids: list[int], n: int) -> list[dict]:
    """A ranking of K outputs with one tie, varying by labeler and task so rankings differ."""
    slots = [1, 2, 2, 3, 4, 5]
    shift = n % len(completion_ids)
    slots = slots[shift:] + slots[:shift]
    return [
        {
            "completion_id": cid,
            "rank": slot,
            "likert": 8 - min(7, slot + 1),
            "flags": ["hallucination"] if slot == 5 else [],
        }
        for cid, slot in zip(completion_ids, slots, strict=True)
    ]


async def labeler_loop(
    base: str,
    token: str,
    index: int,
    measure_from: float,
    stop_at: float,
    stats: LevelStats,
    budget: list[int],
    client_kind: str = "lean",
) -> None:
    """One simulated labeler: lease, rank, submit, until the time or the submission budget runs out."""
    errors = client_errors(client_kind)
    async with open_client(client_kind, base, {"Authorization": f"Bearer {token}"}) as client:
        n = 0
        while time.perf_counter() < stop_at and budget[0] > 0:
            t0 = time.perf_counter()
            try:
                lease = await client.get("/api/v1/tasks/next", params={"kind": "ranking"})
            except errors as exc:
                stats.error("lease", type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            t1 = time.perf_counter()
            measured = t0 >= measure_from
            if lease.status_code == 204:
                stats.exhausted += 1
                return
            if measured:
                stats.lease_ms.append((t1 - t0) * 1000)
            if lease.status_code != 200:
                stats.error("lease", lease.status_code)
                await asyncio.sleep(0.05)
                continue
            task = lease.json()
            body = {"items": ranking_items([c["id"] for c in task["completions"]], index + n), "active_seconds": 12.5}
            t2 = time.perf_counter()
            try:
                submit = await client.post(f"/api/v1/assignments/{task['assignment_id']}/submit", json=body)
            except errors as exc:
                stats.error("submit", type(exc).__name__)
                continue
            t3 = time.perf_counter()
            n += 1
            if submit.status_code != 200:
                stats.error("submit", submit.status_code)
                continue
            stats.submitted_ids.append(submit.json()["id"])
            if measured and t3 <= stop_at:
                stats.submit_ms.append((t3 - t2) * 1000)
                stats.submissions += 1
                budget[0] -= 1


async def floor_loop(
    base: str, stop_at: float, latencies: list[float], errors: list[int], client_kind: str = "lean"
) -> None:
    """One client of the baseline: GET /healthz (one `SELECT 1` through the same stack) in a loop."""
    async with open_client(client_kind, base) as client:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            response = await client.get("/healthz")
            latencies.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200:
                errors.append(response.status_code)


def run_floor(
    base: str, clients: int, seconds: float, meter: CpuMeter | None = None, client_kind: str = "lean"
) -> dict:
    """The same-run baseline: what the web stack itself costs per request (routing, session, one query)."""
    latencies: list[float] = []
    errors: list[int] = []
    before = meter.snapshot() if meter else None

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(floor_loop(base, stop_at, latencies, errors, client_kind) for _ in range(clients)))

    run_async(main())
    after = meter.snapshot() if meter else None
    server = CpuMeter.used(before, after, "server")
    return {
        "clients": clients,
        "requests_per_s": round(len(latencies) / seconds, 1),
        "ms": {f"p{q}": percentile(latencies, q) for q in (50, 95, 99)},
        "errors": len(errors),
        "server_cpu_ms_per_request": None if server is None else round(server / max(1, len(latencies)) * 1000, 2),
    }


def run_async(coro) -> None:
    """Runs the clients' event loop: uvloop (installed with uvicorn[standard]) when present, for less client CPU."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


class CpuMeter:
    """CPU seconds used by the server's processes and by the PostgreSQL backends serving this database.

    The machine is shared, so throughput moves with other people's load; CPU per submission does not
    (much), and says what the hot path costs. psutil is optional: without it the figures are None.
    """

    def __init__(self, server: subprocess.Popen, url: str, db_name: str):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.server, self.url, self.db_name = server, url, db_name
        self.engine = create_engine(url, poolclass=NullPool)
        self.sampler_cpu = 0.0  # CPU seconds the sampling thread of `watching` spent (in the client's process)

    def _processes(self) -> tuple[list, list]:
        try:
            import psutil
        except ImportError:
            return [], []
        root = psutil.Process(self.server.pid)
        with self.engine.connect() as conn:
            pids = (
                conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %(db)s AND pid <> pg_backend_pid()",
                    {"db": self.db_name},
                )
                .scalars()
                .all()
            )
        backends = []
        for pid in pids:
            with suppress(psutil.Error):
                backends.append(psutil.Process(pid))
        return [root, *root.children(recursive=True)], backends

    def snapshot(self) -> dict[int, float] | None:
        """Returns CPU seconds per process id, for the server's processes and the database backends."""
        server, backends = self._processes()
        if not server:
            return None
        times: dict[int, float] = {}
        for kind, procs in (("server", server), ("postgres", backends)):
            for proc in procs:
                try:
                    cpu = proc.cpu_times()
                except Exception:  # noqa: S112  a process that exited meanwhile is skipped
                    continue
                times[(kind, proc.pid)] = cpu.user + cpu.system
        return times

    @contextmanager
    def watching(self, interval: float = 0.5):
        """Samples while a level runs and yields the latest CPU seen per process.

        A PostgreSQL backend that exits before the level's end (the pool closes its overflow connections when
        they come back and the pool is full, which happens at 32 clients) would otherwise take its CPU with it:
        with these samples it counts up to its last one.
        """
        seen: dict = {}
        stop = threading.Event()

        def sample() -> None:
            start = time.thread_time()
            while not stop.wait(interval):
                seen.update(self.snapshot() or {})
            self.sampler_cpu += time.thread_time() - start

        thread = threading.Thread(target=sample, name="cpu-meter", daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            stop.set()
            thread.join()

    @staticmethod
    def used(before: dict | None, after: dict | None, kind: str) -> float | None:
        """Returns the CPU seconds a kind of process used between two snapshots (new processes count from 0)."""
        if before is None or after is None:
            return None
        return sum(t - before.get(key, 0.0) for key, t in after.items() if key[0] == kind)


def run_level(
    base: str,
    tokens: list[str],
    clients: int,
    seconds: float,
    warmup: float,
    max_submissions: int,
    meter: CpuMeter | None = None,
    client_kind: str = "lean",
) -> dict:
    """Runs `clients` labelers at once; returns throughput, latency percentiles, errors and CPU per submission."""
    stats = LevelStats()
    budget = [max_submissions]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    before = meter.snapshot() if meter else None

    async def main() -> None:
        now = time.perf_counter()
        measure_from, stop_at = now + warmup, now + warmup + seconds
        await asyncio.gather(
            *(
                labeler_loop(base, tokens[i], i, measure_from, stop_at, stats, budget, client_kind)
                for i in range(clients)
            )
        )

    sampler0 = meter.sampler_cpu if meter else 0.0
    wall0 = time.perf_counter()
    with meter.watching() if meter else nullcontext({}) as seen:
        run_async(main())
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    after = seen | (meter.snapshot() or {}) if meter else None
    measured_s = min(seconds, max(1e-9, wall - warmup))
    # CPU is counted over the whole level (warm-up included), so per submission it is divided by every
    # submission the level made, measured or not. The meter's sampling thread is not the clients' work.
    made = max(1, len(stats.submitted_ids))
    sampler = (meter.sampler_cpu if meter else 0.0) - sampler0
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime) - sampler
    per_submission = {
        "server": CpuMeter.used(before, after, "server"),
        "postgres": CpuMeter.used(before, after, "postgres"),
        "client": client_cpu,
    }
    return {
        "clients": clients,
        "submissions": stats.submissions,
        "submissions_per_s": round(stats.submissions / measured_s, 1),
        "lease_ms": {f"p{q}": percentile(stats.lease_ms, q) for q in (50, 95, 99)},
        "submit_ms": {f"p{q}": percentile(stats.submit_ms, q) for q in (50, 95, 99)},
        "errors": sum(stats.errors.values()),
        "errors_by_kind": stats.errors,
        "ran_out_of_tasks": stats.exhausted > 0,
        "client_cpu_share": round(client_cpu / wall, 2),
        "cpu_ms_per_submission": {
            k: None if v is None else round(v / made * 1000, 2) for k, v in per_submission.items()
        },
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "_ids": stats.submitted_ids,
    }


# --- the books ----------------------------------------------------------------------------------


def check_books(url: str, rankings_before: int, submitted_ids: list[int]) -> dict:
    """Checks that the database holds exactly the submissions the clients saw succeed."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.connect() as conn:
        q = conn.exec_driver_sql
        stored = q("SELECT count(*) FROM rankings").scalar()
        over = q("SELECT count(*) FROM tasks WHERE done_count > needed").scalar()
        doubled = q(
            "SELECT count(*) FROM (SELECT task_id FROM rankings GROUP BY task_id HAVING count(*) > 1) d"
        ).scalar()
        bad_items = q(
            "SELECT count(*) FROM (SELECT ranking_id FROM ranking_items GROUP BY ranking_id HAVING count(*) <> 6) d"
        ).scalar()
        mismatch = q(
            "SELECT count(*) FROM tasks t WHERE t.done_count <> "
            "(SELECT count(*) FROM rankings r WHERE r.task_id = t.id)"
        ).scalar()
    engine.dispose()
    books = {
        "rankings_stored": stored,
        "new_rankings": stored - rankings_before,
        "submits_answered_200": len(submitted_ids),
        "distinct_ranking_ids": len(set(submitted_ids)),
        "tasks_over_overlap": over,
        "tasks_with_two_rankings": doubled,
        "rankings_without_6_items": bad_items,
        "tasks_whose_count_disagrees": mismatch,
    }
    books["ok"] = (
        books["new_rankings"] == books["submits_answered_200"] == books["distinct_ranking_ids"]
        and over == doubled == bad_items == mismatch == 0
    )
    return books


# --- main ---------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    from app import loop

    loop.wire()  # the services run in this process: wire the stages' reactions
    args = parse_args()
    name = f"instructloop_bench_labeling_{uuid.uuid4().hex[:8]}"
    data_dir = Path(tempfile.mkdtemp(prefix="instructloop-bench-labeling-"))
    print(
        f"creating {name} and loading {args.rankings:,} rankings + {args.open_tasks:,} open tasks ...", file=sys.stderr
    )
    url = create_database(args.pg_admin_url, name)
    os.environ["INSTRUCTLOOP_DATABASE_URL"] = url
    os.environ["INSTRUCTLOOP_DATA_DIR"] = str(data_dir)
    from app.config import get_settings

    get_settings.cache_clear()
    results: list[dict] = []
    floors: list[dict] = []
    all_ids: list[int] = []
    try:
        timings, tokens = load(url, args.rankings, args.open_tasks, max(args.client_levels))
        print(f"loaded in {timings['total']} s: {timings}", file=sys.stderr)
        if args.explain:
            print(explain_lease(url), file=sys.stderr)
        for workers in args.worker_counts:
            proc, base = start_server(url, workers, data_dir, data_dir / f"server-{workers}.log")
            meter = CpuMeter(proc, url, name)
            try:
                floor = run_floor(base, max(args.client_levels), min(args.seconds, 8.0), meter, args.client)
                floors.append(floor | {"workers": workers})
                print(
                    f"workers={workers} baseline GET /healthz at {floor['clients']} clients: "
                    f"{floor['requests_per_s']} requests/s, p50/p99 {floor['ms']['p50']}/{floor['ms']['p99']} ms, "
                    f"server cpu {floor['server_cpu_ms_per_request']} ms/request",
                    file=sys.stderr,
                )
                for clients in args.client_levels:
                    level = run_level(
                        base, tokens, clients, args.seconds, args.warmup, args.max_submissions, meter, args.client
                    )
                    all_ids += level.pop("_ids")
                    level["workers"] = workers
                    results.append(level)
                    print(
                        f"workers={workers} clients={clients:>2}: {level['submissions_per_s']:7.1f} submissions/s"
                        f"  lease p50/p95/p99 {fmt(level['lease_ms']['p50'])}/{fmt(level['lease_ms']['p95'])}/"
                        f"{fmt(level['lease_ms']['p99'])} ms  submit p50/p95/p99 {fmt(level['submit_ms']['p50'])}/"
                        f"{fmt(level['submit_ms']['p95'])}/{fmt(level['submit_ms']['p99'])} ms"
                        f"  errors {level['errors']}  cpu ms/submission {level['cpu_ms_per_submission']}"
                        f"  load {level['load_avg_1m']}",
                        file=sys.stderr,
                    )
            finally:
                stop_server(proc)
        books = check_books(url, args.rankings, all_ids)
    finally:
        if not args.keep_db:
            drop_database(args.pg_admin_url, name)
        shutil.rmtree(data_dir, ignore_errors=True)
    top = max(args.client_levels)
    at_top = [r for r in results if r["clients"] == top]
    best = max(at_top, key=lambda r: r["submissions_per_s"]) if at_top else None
    summary = {
        "benchmark": "labeling",
        "existing_rankings": args.rankings,
        "open_tasks": args.open_tasks,
        "k": K,
        "seconds_per_level": args.seconds,
        "client": args.client,
        "cpu_count": os.cpu_count(),
        "load_s": timings,
        "levels": results,
        "best_at_max_clients": best
        and {key: best[key] for key in ("workers", "clients", "submissions_per_s", "lease_ms", "submit_ms", "errors")},
        "baseline_healthz": floors,
        # A submission is two requests (lease, submit); against two bare requests of the same stack.
        "cpu_vs_two_healthz_requests": [
            round(r["cpu_ms_per_submission"]["server"] / (2 * f["server_cpu_ms_per_request"]), 2)
            for f in floors
            for r in results
            if r["workers"] == f["workers"]
            and r["clients"] == top
            and r["cpu_ms_per_submission"]["server"]
            and f["server_cpu_ms_per_request"]
        ],
        "aim_met": bool(
            best
            and best["submissions_per_s"] >= 300
            and (best["submit_ms"]["p99"] or 1e9) < 100
            and best["errors"] == 0
        ),
        "books": books,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
