"""The skeleton itself: settings, migrations, process boundaries, the CLI and the compose file."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import PG_ADMIN_URL, ROOT


def test_production_refuses_the_default_secret_key(monkeypatch):
    from pydantic import ValidationError

    from app.config import Settings

    monkeypatch.delenv("INSTRUCTLOOP_SECRET_KEY", raising=False)
    with pytest.raises(ValidationError, match="INSTRUCTLOOP_SECRET_KEY is still the default"):
        Settings(environment="production")
    assert Settings(environment="production", secret_key="x" * 40).secret_key == "x" * 40
    assert Settings(environment="demo").environment == "demo"


def test_embedded_default_uses_sqlite_and_filesystem_broker(tmp_path):
    from app.config import Settings

    settings = Settings(database_url="", broker_url="", data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'instructloop.sqlite3'}"
    assert settings.resolved_broker_url == "filesystem://"


def test_migrations_round_trip_on_postgresql():
    """upgrade head → downgrade base → upgrade head, then the schema matches the models."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, text

    from app.db import alembic_config
    from app.models import Base

    name = f"instructloop_migrate_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        config = alembic_config(url)
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        engine = create_engine(url)
        with engine.connect() as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
        assert set(tables) <= {"alembic_version"}
        command.upgrade(config, "head")
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_constraints_make_bad_states_impossible(db, backend):
    from sqlalchemy.exc import IntegrityError

    from app.models import PromptBatch, Task
    from tests.factories import BatchFactory, PromptFactory

    def insert(row: object) -> None:
        # A savepoint, so the refused row is rolled back and the test's session stays usable.
        with db.begin_nested():
            db.add(row)
            db.flush()

    with pytest.raises(IntegrityError):
        insert(PromptBatch(name="bad-k", k=12))
    prompt = PromptFactory(batch=BatchFactory())
    with pytest.raises(IntegrityError):
        insert(Task(batch_id=prompt.batch_id, prompt_id=prompt.id, kind="ranking", k=3, needed=1))


def test_web_process_never_imports_torch_or_the_worker():
    code = (
        "import sys; from app.main import create_app; create_app(); "
        "bad = [m for m in sys.modules if m == 'torch' or m == 'worker' or m.startswith(('torch.', 'worker.'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _cli_command_names() -> dict[str, object]:
    import typer

    from app.cli import cli

    group = typer.main.get_command(cli)
    return group, group.commands


def test_compose_services_run_real_cli_commands():
    """No Docker engine runs here, so check that every service's command parses as a real CLI call."""
    import click

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "web", "worker-gpu", "worker-cpu", "beat"} <= set(services)
    assert services["postgres"]["healthcheck"] and "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert [name for name, s in services.items() if "beat" in (s.get("command") or [])] == ["beat"]
    group, commands = _cli_command_names()
    for name, service in services.items():
        command = service.get("command")
        if not command or command[0] != "instructloop":
            continue
        sub = commands.get(command[1])
        assert sub is not None, f"{name}: '{command[1]}' is not an instructloop command"
        with click.Context(group) as parent:
            sub.make_context(command[1], list(command[2:]), parent=parent)  # raises on a bad option
    assert "--queues" in services["worker-gpu"]["command"] and "gpu" in services["worker-gpu"]["command"]
    assert (ROOT / "Dockerfile").exists()


def test_create_user_and_token_from_the_cli(committed):
    env_cmd = [sys.executable, "-m", "app.cli"]
    created = subprocess.run(
        [*env_cmd, "create-user", "cli-admin", "--role", "admin", "--password", "long-enough-pw"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert created.returncode == 0, created.stderr
    dup = subprocess.run(
        [*env_cmd, "create-user", "cli-admin", "--role", "admin", "--password", "long-enough-pw"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert dup.returncode == 2 and "already exists" in dup.stderr
    token = subprocess.run(
        [*env_cmd, "create-token", "--user", "cli-admin", "--scopes", "export:read,admin"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert token.returncode == 0, token.stderr
    raw = token.stdout.strip().splitlines()[-1]
    assert raw.startswith("il_") and len(raw) > 40
    bad = subprocess.run(
        [*env_cmd, "create-token", "--user", "cli-admin", "--scopes", "root"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown root" in bad.stderr

    from sqlalchemy import select

    from app.db import get_sessionmaker
    from app.models import ApiToken
    from app.security import resolve_api_token

    with get_sessionmaker()() as db:
        found = resolve_api_token(db, raw)
        assert found is not None and found[1].username == "cli-admin"
        assert db.scalar(select(ApiToken.token_hash)) != raw


def test_create_user_prompts_for_the_password(committed):
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "create-user", "prompted", "--role", "labeler"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        input="a-long-password\na-long-password\n",
    )
    assert result.returncode == 0, result.stderr
    assert "created labeler" in result.stderr


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    # One place pins the CPU torch wheel: the Makefile's TORCH default (the lock holds the same version).
    assert re.findall(r"^TORCH \?= (.*)$", Path(ROOT / "Makefile").read_text(), re.M) == ["torch==2.13.0"]
    assert re.search(r"^torch==2\.13\.0 ", (ROOT / "requirements-dev.lock").read_text(), re.M)


def test_make_demo_takes_the_port_and_host():
    dry = subprocess.run(
        ["make", "-n", "demo", "PORT=8123", "HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert "instructloop demo --host 0.0.0.0 --port 8123" in dry.stdout
