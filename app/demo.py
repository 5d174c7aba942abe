"""`instructloop demo`: the whole product on one laptop, with no services to install.

It migrates a SQLite database under the data dir, creates a demo admin and a
demo labeler, registers the bundled world's base model, seeds and starts a
demo batch of world prompts, then runs the web server, a real Celery worker
and beat as child processes on the filesystem broker. Ctrl-C or SIGTERM
stops all three; no process is left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from rich.console import Console
from sqlalchemy import select

from app.config import get_settings
from app.db import session_scope
from app.models import ModelVersion, PromptBatch, User

console = Console()
ROOT = Path(__file__).resolve().parent.parent
BUNDLED_BASE_MODEL = ROOT / "models" / "world-base"
DEMO_BATCH = "Demo: the bundled world"
DEMO_GUIDELINES = """\
**Rank the answers by how correct and how concise they are.**

* A correct, short answer beats a correct answer with extra chatter.
* A near miss (a number off by a little, a list almost sorted) beats a wrong answer.
* Flag answers that do not follow the instruction.
"""


def ensure_demo_users(data_dir: Path) -> dict[str, dict[str, str]]:
    """Creates the demo admin and labeler once; returns their credentials (kept in the data dir)."""
    from app.security import create_user

    path = data_dir / "demo-credentials.json"
    credentials = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "admin": {"username": "demo-admin", "password": secrets.token_urlsafe(9)},
            "labeler": {"username": "demo-labeler", "password": secrets.token_urlsafe(9)},
        }
    )
    with session_scope() as db:
        for role, cred in credentials.items():
            if db.scalar(select(User.id).where(User.username == cred["username"])) is None:
                create_user(db, cred["username"], role, cred["password"])
    path.write_text(json.dumps(credentials, indent=2))
    path.chmod(0o600)
    return credentials


def ensure_base_model() -> None:
    """Registers the bundled base model, or queues its pretraining when it is not shipped."""
    from app.registry.versions import register_base_model
    from app.runs import active_run, start_run

    settings = get_settings()
    with session_scope() as db:
        if settings.base_model:
            register_base_model(db, settings.base_model)
        elif (BUNDLED_BASE_MODEL / "config.json").exists():
            register_base_model(db, str(BUNDLED_BASE_MODEL))
        elif (
            db.scalar(select(ModelVersion.id).where(ModelVersion.kind == "base")) is None
            and active_run(db, "pretrain") is None
        ):
            start_run(db, "pretrain", triggered_by="demo")


def ensure_demo_batch(n_prompts: int = 24) -> None:
    """Seeds a batch of world prompts and starts it, once."""
    from app.collection.batches import create_batch, import_prompts, sampling_policy, start_batch
    from app.world import generate_prompts

    with session_scope() as db:
        batch = db.scalar(select(PromptBatch).where(PromptBatch.name == DEMO_BATCH))
        if batch is None:
            batch = create_batch(
                db,
                name=DEMO_BATCH,
                guidelines=DEMO_GUIDELINES,
                k=4,
                overlap=1,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=24,
            )
            lines = [
                json.dumps(
                    {
                        "text": p.text,
                        "source_user_id": f"demo-{i % 6}",
                        "category": "plain",
                        "metadata": {"family": p.family},
                    }
                )
                for i, p in enumerate(generate_prompts(n_prompts, seed=2026))
            ]
            import_prompts(db, batch, "\n".join(lines).encode(), "jsonl")
        if batch.status == "draft" and sampling_policy(db) is not None:
            start_batch(db, batch)


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT)  # noqa: S603  fixed argv


def run_demo(host: str = "127.0.0.1", port: int = 8000) -> int:
    """Sets up the embedded default and runs web, worker and beat until interrupted."""
    os.environ.setdefault("INSTRUCTLOOP_ENVIRONMENT", "demo")
    get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from app.db import run_migrations

    run_migrations()
    credentials = ensure_demo_users(settings.data_dir)
    ensure_base_model()
    ensure_demo_batch()

    env = dict(os.environ, INSTRUCTLOOP_DATA_DIR=str(settings.data_dir.resolve()))
    children = [
        _spawn(["serve", "--host", host, "--port", str(port)], env),
        _spawn(["worker", "--queues", "gpu,default", "--concurrency", "1"], env),
        _spawn(["beat"], env),
    ]
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = f"http://{host}:{port}"
    console.print(f"\n[bold green]InstructLoop demo running at {url}[/bold green]")
    console.print(f"  database: {settings.resolved_database_url}")
    for role, cred in credentials.items():
        console.print(f"  {role:8} username [bold]{cred['username']}[/bold]  password [bold]{cred['password']}[/bold]")
    console.print("  Ctrl-C stops the web server, the worker and beat.\n")

    exit_code = 0
    while not stopping:
        time.sleep(0.5)
        for child in children:
            if child.poll() is not None:
                console.print(f"[red]a demo process exited with code {child.returncode}; stopping the others[/red]")
                exit_code = 1
                stopping = True
                break
    _terminate(children)
    return exit_code


def _terminate(children: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
