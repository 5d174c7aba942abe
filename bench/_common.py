"""Shared machinery of the benchmarks and fault scripts: databases, servers, private PostgreSQL and Redis.

The benchmarks (`bench/labeling.py`) and the fault scenarios (`bench/fault_*.py`)
need the same things: a migrated throwaway database, the real web server
(`python -m app.cli serve --workers N`) on a free local port, Celery workers,
and, for the faults, a PostgreSQL and a Redis of their own that can be stopped,
killed and restarted without touching the machine's shared instances (other
people and the test suite use 127.0.0.1:5432 and :6379). Everything here runs
only on 127.0.0.1 and cleans up what it started, by process id.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Returns a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Returns the q-th percentile (nearest rank) of the values, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return round(ordered[rank - 1], 2)


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """p50/p95/p99 (by default) of the values, in their unit, rounded."""
    return {f"p{q:g}": percentile(values, q) for q in qs} | {"max": round(max(values), 2) if values else None}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and range of per-seed or per-repeat figures."""
    import statistics

    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def load_avg() -> float:
    """The machine's 1-minute load average (shared machine: every figure is reported beside it)."""
    return round(os.getloadavg()[0], 2)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, message: str = "condition"):
    """Polls `predicate` until it returns something truthy and returns that; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def emit(summary: dict[str, Any]) -> int:
    """Prints the summary as the last stdout line and returns the exit status (0 when `summary['ok']`)."""
    print(json.dumps(summary, default=str), flush=True)
    return 0 if summary.get("ok") else 1


def wire_loop() -> None:
    """Wires the stages' event handlers, as every process that calls the services in process must."""
    sys.path.insert(0, str(ROOT))
    from app import loop

    loop.wire()


# --- databases ------------------------------------------------------------------------------------


def create_database(admin_url: str, name: str) -> str:
    """Creates an empty database and migrates it to head with Alembic; returns its URL."""
    from alembic import command
    from sqlalchemy import create_engine, text

    sys.path.insert(0, str(ROOT))
    from app.db import alembic_config

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    command.upgrade(alembic_config(url), "head")
    return url


def drop_database(admin_url: str, name: str) -> None:
    """Drops a benchmark database, closing whatever still holds it."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _postgres_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    on_path = shutil.which(tool)
    if on_path is None:
        raise FileNotFoundError(f"{tool} not found under /usr/lib/postgresql/*/bin or on PATH: install postgresql")
    return on_path


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port, ours to stop, kill and restart.

    The fault scenarios restart the database under load; doing that to the machine's
    shared server would break everyone else's work, so each scenario gets its own
    cluster (initdb into a temporary directory, about a second). initdb refuses to
    run as root, so as root the cluster belongs to the `postgres` account.
    """

    def __init__(self, max_connections: int = 400, log_dir: Path | None = None):
        self.port = free_port()
        self.max_connections = max_connections
        self.root = Path(tempfile.mkdtemp(prefix="instructloop-pg-"))
        self.data = self.root / "data"
        self.log = (log_dir or self.root) / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            if log_dir is not None:
                self.log.touch()
                shutil.chown(self.log, "postgres", "postgres")

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def start(self) -> PrivatePostgres:
        """Creates the cluster on first use and starts it; returns when it accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            self._run(
                _postgres_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections} -c shared_buffers=128MB"
        )
        self._run(
            _postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stops the server (`fast`: running transactions are aborted, as in a restart by an operator)."""
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def close(self) -> None:
        """Stops the server and deletes the cluster."""
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class PrivateRedis:
    """A redis-server on a free port, without persistence, that a scenario may stop and start again."""

    def __init__(self, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        # The child keeps its own copy of the log's descriptor; ours is closed once it is started.
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self.answers, timeout=15, interval=0.1, message=f"redis-server on port {self.port}")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kills the server (SIGKILL: an outage, not a graceful shutdown); nothing it held survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# --- processes ------------------------------------------------------------------------------------


def start_server(
    url: str, workers: int, data_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Starts `python -m app.cli serve --workers N` on a free local port and waits for /healthz."""
    import httpx

    port = free_port()
    environment = dict(
        os.environ, INSTRUCTLOOP_DATABASE_URL=url, INSTRUCTLOOP_DATA_DIR=str(data_dir), INSTRUCTLOOP_ENVIRONMENT="local"
    ) | (env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base + "/healthz", timeout=1.0).status_code == 200:
                # Every worker process must be up before measuring, not only the first to answer.
                for _ in range(4 * workers):
                    httpx.get(base + "/healthz", timeout=5.0)
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise TimeoutError(f"the server did not answer within 60 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    """Stops a server or worker we started (its whole process group: uvicorn's or Celery's children too)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:
        with contextlib.suppress(ProcessLookupError):  # the leader is gone; children it left behind are still ours
            os.killpg(proc.pid, signal.SIGKILL)


def child_pids(proc: subprocess.Popen) -> list[int]:
    """The live worker processes of a server or Celery worker we started (not multiprocessing's helpers)."""
    import psutil

    found = []
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(child.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(child.pid)
    return sorted(found)


def start_celery_worker(env: dict[str, str], log_path: Path, broker_url: str, wait: bool = True) -> subprocess.Popen:
    """Starts a real Celery worker (both queues, one job at a time); with `wait`, returns once it answers a ping."""
    from celery import Celery

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "worker",
                "--queues",
                "gpu,default",
                "--concurrency",
                "1",
                "--loglevel",
                "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if not wait:
        return proc
    pinger = Celery("instructloop-bench-ping", broker=broker_url)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the celery worker exited with {proc.returncode}; see {log_path}")
            if pinger.control.ping(timeout=0.5):
                return proc
    finally:
        pinger.close()
    stop_server(proc)
    raise TimeoutError(f"the celery worker did not answer a ping within 90 s; see {log_path}")
