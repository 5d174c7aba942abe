"""The `instructloop` command: run each process, manage accounts, move data in and out.

`serve`, `worker` and `beat` are the production processes (docker-compose
runs exactly these); `demo` runs all three on the embedded default. Commands
that need torch import the worker package lazily, so `instructloop serve`
never loads it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from app import loop
from app.config import get_settings
from app.db import run_migrations

cli = typer.Typer(help="InstructLoop: collect human feedback and retrain models on it.", no_args_is_help=True)
world_cli = typer.Typer(help="The bundled world: a toy domain with checkable answers and a tiny model.")
cli.add_typer(world_cli, name="world")
models_cli = typer.Typer(help="Model versions: bring your own Hugging Face causal LM, list what is registered.")
cli.add_typer(models_cli, name="models")
console = Console(stderr=True)


@cli.command()
def migrate() -> None:
    """Apply database migrations (a one-off step before starting the web); registers INSTRUCTLOOP_BASE_MODEL once."""
    run_migrations()
    console.print("[green]database is at the newest schema[/green]")
    source = get_settings().base_model
    if not source:
        return
    # Every deployment runs this step before its web starts (compose's `migrate` service), so the
    # configured base model is registered here, once; a worker validates it and then promotes it.
    from app.db import session_scope
    from app.errors import AppError
    from app.registry.versions import ensure_configured_base_model

    try:
        with session_scope() as db:
            version, new = ensure_configured_base_model(db, source)
            said = "registered" if new else "already registered as"
            console.print(f"base model {source}: {said} version {version.id} ({version.name}, {version.status})")
    except AppError as exc:
        console.print(f"[red]error:[/red] INSTRUCTLOOP_BASE_MODEL: {exc}")
        raise typer.Exit(2) from exc


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Number of uvicorn worker processes.")] = 1,
    keep_alive: Annotated[int, typer.Option(help="Seconds an idle keep-alive connection stays open.")] = 75,
) -> None:
    """Run the web server (pages, JSON API, /docs)."""
    import uvicorn

    # loop/http "auto" pick uvloop and httptools (installed by uvicorn[standard]) and fall back to asyncio
    # and h11 where those are missing (uvloop has no Windows build).
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        log_level="info",
        loop="auto",
        http="auto",
        # Longer than clients and proxies keep idle connections (httpx 5 s, most proxies 60 s): a server
        # that closes first races the client's next request on that connection, which then fails with
        # no answer (uvicorn's default of 5 s did that to 35 of 4,903 requests in bench/fault_load.py).
        timeout_keep_alive=keep_alive,
    )


@cli.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: gpu, default.")] = "gpu,default",
    concurrency: Annotated[int, typer.Option(help="Parallel tasks; 1 for a GPU worker.")] = 1,
    max_tasks_per_child: Annotated[int, typer.Option(help="Fresh process after N tasks (1 frees GPU memory).")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
) -> None:
    """Run a Celery worker for sampling and training jobs."""
    from worker.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            f"--queues={queues}",
            f"--concurrency={concurrency}",
            f"--max-tasks-per-child={max_tasks_per_child}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--pool=prefork",
        ]
    )


@cli.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info") -> None:
    """Run the one Celery beat: dispatch, reaper, lease expiry, retrain checks."""
    from worker.celery_app import app as celery_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.Beat(loglevel=loglevel, schedule=str(settings.data_dir / "celerybeat-schedule")).run()


@cli.command("create-user")
def create_user_cmd(
    name: Annotated[str, typer.Argument(help="Username.")],
    role: Annotated[str, typer.Option(help="admin or labeler.")] = "labeler",
    password: Annotated[str | None, typer.Option(help="Password; asked for when omitted.")] = None,
) -> None:
    """Create a user account."""
    from app.db import session_scope
    from app.security import CredentialError, create_user

    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        with session_scope() as db:
            user = create_user(db, name, role, password)
            console.print(f"created {user.role} [bold]{user.username}[/bold] (id {user.id})")
    except CredentialError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@cli.command("create-token")
def create_token_cmd(
    user: Annotated[str, typer.Option("--user", help="Owner's username.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: export:read, label, admin.")],
    name: Annotated[str, typer.Option(help="A label to recognise the token by.")] = "",
) -> None:
    """Create an API token; the token is printed alone on the last line."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import User
    from app.security import CredentialError, create_api_token, parse_scopes

    try:
        with session_scope() as db:
            owner = db.scalar(select(User).where(User.username == user))
            if owner is None:
                raise CredentialError("user", f"no user named '{user}'", 404)
            raw, token = create_api_token(db, owner, parse_scopes(scopes), name)
            console.print(
                f"token {token.id} for {owner.username} with scopes {', '.join(token.scopes)}; it is shown only now:"
            )
    except CredentialError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    print(raw)


@cli.command()
def demo(
    host: Annotated[str, typer.Option(help="Interface for the web server.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the web server.")] = 8000,
) -> None:
    """Run the whole product on the embedded default: SQLite, a filesystem broker, web + worker + beat."""
    from app.demo import run_demo

    sys.exit(run_demo(host=host, port=port))


@world_cli.command("pretrain")
def world_pretrain(
    out: Annotated[
        Path | None,
        typer.Option(help="Where to save the base model (default: the data folder's artifacts/models/world-base)."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    register: Annotated[bool, typer.Option(help="Register it as the base model version.")] = True,
) -> None:
    """Pretrain the tiny base model on the bundled world's corpus (CPU, minutes)."""
    from worker.world_model import pretrain_base

    # Generated files go to the data folder, never into the source tree (models/world-base is the shipped one).
    out = out or get_settings().artifacts_dir / "models" / "world-base"
    kwargs = {"steps": steps} if steps else {}
    metrics = pretrain_base(out, seed=seed, progress=True, **kwargs)
    console.print(f"saved base model to {out}: {metrics}")
    if register:
        from app.db import session_scope
        from app.registry.versions import register_base_model

        run_migrations()
        with session_scope() as db:
            version = register_base_model(db, str(out), metrics=metrics)
            console.print(f"registered model version {version.name}")


@cli.command("export")
def export_cmd(
    kind: Annotated[str, typer.Argument(help="comparisons, demonstrations or rankings.")],
    out: Annotated[Path, typer.Option(help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    gzip: Annotated[bool, typer.Option(help="Write a gzip file.")] = False,
    batch: Annotated[str | None, typer.Option(help="Prompt batch id or name.")] = None,
    split: Annotated[str | None, typer.Option(help="train, valid or test.")] = None,
    since: Annotated[str | None, typer.Option(help="Submitted at or after (ISO 8601, UTC if naive).")] = None,
    until: Annotated[str | None, typer.Option(help="Submitted before (ISO 8601).")] = None,
    labeler: Annotated[str | None, typer.Option(help="Pseudonymous labeler id (lab_...).")] = None,
    model_version: Annotated[str | None, typer.Option(help="Model version id or name.")] = None,
    min_overlap: Annotated[int | None, typer.Option(help="Only tasks labeled by at least N labelers.")] = None,
    exclude_flagged: Annotated[bool, typer.Option(help="Drop rankings marked all-unacceptable.")] = False,
    cursor: Annotated[str | None, typer.Option(help="Resume after the row carrying this cursor.")] = None,
    schema: Annotated[
        str,
        typer.Option(
            help="Row shape: trl, trl_chat, openai or hh_rlhf (comparisons, demonstrations); kto or kway (rankings)."
        ),
    ] = "trl",
    margin: Annotated[str | None, typer.Option(help="Comparisons: add a margin per pair, rank or likert.")] = None,
) -> None:
    """Export demonstrations, comparisons or rankings from one database snapshot, with a progress bar."""
    from datetime import datetime

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from app.db import get_engine
    from app.export.stream import ExportError, SnapshotExport

    def when(param: str, value: str | None) -> datetime | None:
        try:
            return datetime.fromisoformat(value) if value else None
        except ValueError as exc:
            raise ExportError(param, f"not an ISO 8601 time: {value!r}") from exc

    try:
        export = SnapshotExport(
            get_engine(),
            kind,
            secret_key=get_settings().secret_key,
            fmt=fmt,
            cursor=cursor,
            gzip=gzip,
            schema=schema,
            margin=margin,
            batch=batch,
            split=split,
            since=when("since", since),
            until=when("until", until),
            labeler=labeler,
            model_version=model_version,
            min_overlap=min_overlap,
            exclude_flagged=exclude_flagged,
        )
    except ExportError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    unit = "demonstrations" if kind == "demonstrations" else "rankings"
    columns = (TextColumn(f"{kind}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn())
    written = 0
    with Progress(*columns, console=console) as progress, out.open("wb") as handle:
        task = progress.add_task(kind, total=export.count_units())
        for chunk in export.chunks(on_progress=lambda n: progress.advance(task, n)):
            handle.write(chunk)
            written += len(chunk)
    console.print(f"wrote {written:,} bytes to {out}")


@cli.command("import-prompts")
def import_prompts_cmd(
    file: Annotated[Path, typer.Argument(help="JSON Lines or CSV file of prompts.", exists=True, dir_okay=False)],
    batch: Annotated[str, typer.Option("--batch", help="Batch name; a draft batch is created when none has it.")],
    replace: Annotated[bool, typer.Option(help="Replace the draft batch's current prompts.")] = False,
    prefix_chars: Annotated[int, typer.Option(help="Shared-prefix length that marks a near duplicate.")] = 100,
    max_per_user: Annotated[int, typer.Option(help="Most prompts kept per source_user_id.")] = 200,
) -> None:
    """Import prompts into a batch with hygiene; all-or-nothing, errors listed by line."""
    import json

    from sqlalchemy import select

    from app.collection.api import Upload, hygiene_summary, run_import
    from app.collection.batches import create_batch
    from app.db import session_scope
    from app.errors import AppError
    from app.models import PromptBatch

    try:
        with session_scope() as db:
            target = db.scalar(select(PromptBatch).where(PromptBatch.name == batch))
            if target is None:
                target = create_batch(db, name=batch)
                console.print(f"created draft batch [bold]{batch}[/bold] (id {target.id})")
            outcome, replaced = run_import(
                db,
                target,
                Upload(file.read_bytes(), file.name, None),
                replace=replace,
                prefix_chars=prefix_chars,
                max_per_user=max_per_user,
            )
            if not outcome.ok:
                # Raising rolls the session back: not even the batch created above is kept.
                for issue in outcome.errors["errors"]:
                    console.print(f"line {issue['line']}: {issue['field'] or '-'}: {issue['message']}")
                console.print(f"[red]{outcome.errors['total']} errors; nothing was imported[/red]")
                raise typer.Exit(1)
            report = hygiene_summary(target.hygiene_report)
            console.print(f"stored {outcome.stored} of {report['received']} prompts into {batch} (replaced {replaced})")
            print(
                json.dumps({"batch_id": target.id, "stored": outcome.stored, "replaced": replaced, "hygiene": report})
            )
    except AppError as exc:  # the batch's, or the file's (binary: not JSON Lines or CSV)
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@models_cli.command("register")
def models_register(
    source: Annotated[str, typer.Argument(help="A model folder (as the worker sees it) or a Hugging Face hub id.")],
    name: Annotated[str, typer.Option(help="A unique name for the new version.")],
    kind: Annotated[str, typer.Option(help="base, sft, rm or policy.")] = "base",
    revision: Annotated[str | None, typer.Option(help="A hub branch, tag or commit.")] = None,
    promote: Annotated[bool, typer.Option(help="Promote it once validation succeeds.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the worker's validation; exit 1 when it fails.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 1800.0,
) -> None:
    """Register a model; a worker validates it (prints the version id and status)."""
    import time

    from app.db import session_scope
    from app.errors import AppError
    from app.models import ModelVersion
    from app.registry.versions import register_model

    try:
        with session_scope() as db:
            version = register_model(db, source, name, kind=kind, revision=revision, promote=promote)
            version_id, status = version.id, version.status
    except AppError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    print(f"{version_id} {status}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while status == "validating" and time.monotonic() < deadline:
        time.sleep(1.0)
        with session_scope() as db:
            found = db.get(ModelVersion, version_id)
            status, error = (found.status, found.error) if found is not None else ("failed", "the version was deleted")
    print(f"{version_id} {status}")
    if status == "validating":
        console.print(f"[red]error:[/red] still validating after {timeout:.0f} s; is a worker running?")
        raise typer.Exit(1)
    if status == "failed":
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1)


@models_cli.command("list")
def models_list() -> None:
    """List model versions, newest first: id, name, kind, status, parameters, source."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import ModelVersion

    with session_scope() as db:
        rows = db.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()
        print("id\tname\tkind\tstatus\tparameters\tsource")
        for v in rows:
            params = (v.facts or {}).get("parameters") or (v.metrics or {}).get("parameters")
            shown = params if params is not None else "-"
            print(f"{v.id}\t{v.name}\t{v.kind}\t{v.status}\t{shown}\t{v.source or v.artifact_path}")


def main() -> None:
    """Entry point of the console script."""
    loop.wire()
    cli()


if __name__ == "__main__":
    main()
