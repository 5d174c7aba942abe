"""Test harness: real PostgreSQL and Redis, Alembic-migrated databases, a real Celery worker, real Chromium.

- One fresh PostgreSQL database per test run, migrated by Alembic; each
  test runs in a transaction that is rolled back (`db`, `client`).
- Tests marked `sqlite` run a second time on a migrated SQLite file (the
  embedded default).
- `live_server` and `celery_worker` are real processes on committed data;
  tests that use them get the tables emptied afterwards (`committed`).
- `browser` is headless Debian Chromium driven by Playwright.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("INSTRUCTLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_RUN_ID = uuid.uuid4().hex[:8]
# A Redis database of its own per test run, so two runs on one machine never consume each other's jobs.
REDIS_URL = os.environ.get("INSTRUCTLOOP_TEST_REDIS", f"redis://127.0.0.1:6379/{1 + int(_RUN_ID, 16) % 15}")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

TEST_DB_NAME = f"instructloop_test_{_RUN_ID}"
TEST_DB_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{TEST_DB_NAME}"
DATA_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"instructloop-test-{_RUN_ID}"

# Every process the tests start (and this one) reads these.
os.environ.update(
    {
        "INSTRUCTLOOP_ENVIRONMENT": "test",
        "INSTRUCTLOOP_DATABASE_URL": TEST_DB_URL,
        "INSTRUCTLOOP_BROKER_URL": REDIS_URL,
        "INSTRUCTLOOP_DATA_DIR": str(DATA_DIR),
        "INSTRUCTLOOP_SECRET_KEY": "test-secret-" + _RUN_ID,
        # The webhook tests deliver to receivers on this machine, which webhooks may not reach by default
        # (tests/security/test_webhook_ssrf.py checks that default).
        "INSTRUCTLOOP_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    }
)


def pytest_configure(config):
    from app import loop
    from app.config import get_settings

    get_settings.cache_clear()
    loop.wire()


def pytest_generate_tests(metafunc):
    # Tests marked `sqlite` also run on the embedded default's database; `sqlite(only=True)` runs only there
    # (a property of the embedded default alone), so no test is collected just to be skipped.
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("sqlite")
        if marker is None:
            backends = ["postgresql"]
        else:
            backends = ["sqlite"] if marker.kwargs.get("only") else ["postgresql", "sqlite"]
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request) -> str:
    return getattr(request, "param", "postgresql")


# --- databases ----------------------------------------------------------------------------------


def _migrate(url: str) -> None:
    from alembic import command

    from app.db import alembic_config

    command.upgrade(alembic_config(url), "head")


@pytest.fixture(scope="session")
def pg_engine():
    """A fresh PostgreSQL database for this run, migrated to head, dropped at the end."""
    from sqlalchemy import create_engine, text

    from app.db import get_engine

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB_NAME}"'))
        conn.execute(text(f'CREATE DATABASE "{TEST_DB_NAME}"'))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    _migrate(TEST_DB_URL)
    engine = get_engine()
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB_NAME}" WITH (FORCE)'))
    admin.dispose()
    shutil.rmtree(DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A SQLite file migrated to head once; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite") / "template.sqlite3"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def db(backend, request, tmp_path):
    """A session whose work is thrown away after the test (rolled back, or a throwaway SQLite copy)."""
    from sqlalchemy.orm import Session

    if backend == "sqlite":
        from app.db import make_engine

        template = request.getfixturevalue("sqlite_template")
        path = tmp_path / "test.sqlite3"
        shutil.copy(template, path)
        engine = make_engine(f"sqlite:///{path}")
        session = Session(bind=engine, expire_on_commit=False)
        yield session
        session.close()
        engine.dispose()
        return
    engine = request.getfixturevalue("pg_engine")
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield session
    session.close()
    outer.rollback()
    connection.close()


@pytest.fixture
def app(db):
    """The web app with its database dependency bound to the test's session."""
    from app.deps import get_db
    from app.main import create_app

    application = create_app()

    def override():
        db.commit()  # what the test set up so far survives a request that rolls back
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise

    application.dependency_overrides[get_db] = override
    return application


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def committed(pg_engine):
    """For tests whose data must be visible to other processes: empties every table afterwards."""
    yield pg_engine
    truncate_all(pg_engine)


def truncate_all(engine) -> None:
    from sqlalchemy import text

    from app.models import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    # Ids restart, and a run's checkpoints and models live under its id: a later test's run 1 must not find
    # (and try to resume from) an earlier test's run 1.
    shutil.rmtree(DATA_DIR / "artifacts", ignore_errors=True)


@pytest.fixture
def admin(db):
    """An admin user in the test's transaction."""
    from tests.factories import AdminFactory

    return AdminFactory()


@pytest.fixture
def auth(db, admin):
    """Headers that authenticate as `admin` with an admin-scoped API token."""
    from app.security import create_api_token

    raw, _ = create_api_token(db, admin, ["admin"])
    return {"authorization": f"Bearer {raw}"}


@pytest.fixture
def committed_session(committed):
    """A session that really commits, for data other processes must see."""
    from app.db import get_sessionmaker

    session = get_sessionmaker()()
    yield session
    session.close()


@pytest.fixture
def worker_client(committed_session):
    """An API client whose requests really commit, so the worker process sees what they registered."""
    from fastapi.testclient import TestClient

    from app.deps import get_db
    from app.main import create_app

    application = create_app()

    def override():
        try:
            yield committed_session
            committed_session.commit()
        except BaseException:
            committed_session.rollback()
            raise

    application.dependency_overrides[get_db] = override
    with TestClient(application, base_url="http://testserver") as c:
        yield c


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def live_server(pg_engine) -> Iterator[str]:
    """A real uvicorn serving the app on the test database."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/healthz", proc=proc)
    yield url
    stop_process(proc)


def start_celery_worker(env: dict[str, str] | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """Starts a real Celery worker process on both queues and waits until it answers a ping."""
    from app.outbox import sender

    # The worker inherits its own copy of the log file's descriptor, so ours is closed once it has started.
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log_path, "ab")) if log_path else subprocess.DEVNULL
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
            env=env or dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited with {proc.returncode}")
        if sender().control.ping(timeout=0.5):
            return proc
    stop_process(proc)
    raise TimeoutError("celery worker did not answer a ping within 60 s")


@pytest.fixture
def celery_worker(committed, tmp_path) -> Iterator[subprocess.Popen]:
    """A real Celery worker process consuming the test broker (Redis)."""
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    proc = start_celery_worker(log_path=tmp_path / "worker.log")
    proc.log_path = tmp_path / "worker.log"  # type: ignore[attr-defined]
    yield proc
    stop_process(proc, timeout=30)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.25, message: str = "condition"):
    """Polls `predicate` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {message}")


# --- browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    """Headless Debian Chromium, launched once per run."""
    if not Path(CHROMIUM).exists():
        # A failure, never a skip: a run without the browser tests must not pass for a full one.
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it, or run `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context()
    pg = context.new_page()
    pg.set_default_timeout(15000)
    yield pg
    context.close()


@pytest.fixture(autouse=True)
def _factories(request):
    """Binds the factories to the test's session when the test has one."""
    if "db" in request.fixturenames:
        from tests.factories import bind_factories

        bind_factories(request.getfixturevalue("db"))


@pytest.fixture
def login(client):
    """Logs a user in through the real form; returns the session's CSRF token."""
    import re

    from tests.factories import PASSWORD

    def do(username: str, password: str = PASSWORD) -> str:
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        response = client.post(
            "/login", data={"username": username, "password": password, "csrf_token": token}, follow_redirects=False
        )
        assert response.status_code == 303, response.text
        page = client.get(response.headers["location"])
        return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)

    return do
