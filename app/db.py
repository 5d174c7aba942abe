"""Database engine and sessions shared by the web, the worker and the CLI.

Services take a `Session` and never commit; whoever opened the session (the
request dependency, a Celery task wrapper, a CLI command) commits or rolls
back, so one request or one job is one transaction. PostgreSQL is the
production store; the embedded default uses SQLite in WAL mode so that the
web, the worker and beat can share one file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings

if TYPE_CHECKING:  # Alembic is imported only when migrations run
    from alembic.config import Config


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Creates an engine with the settings each backend needs."""
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", POOL_SIZE)
        kwargs.setdefault("max_overflow", MAX_OVERFLOW)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - exercised by sqlite tests
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # pool_pre_ping: a restarted PostgreSQL leaves stale pooled connections behind.
    return create_engine(url, pool_pre_ping=True, **kwargs)


# Connections per process: the web admits no more requests at once than this (app.main.AdmissionMiddleware).
POOL_SIZE = 10
MAX_OVERFLOW = 20


def max_connections() -> int:
    """Returns how many database connections one process may hold at once."""
    return POOL_SIZE + MAX_OVERFLOW


@lru_cache
def get_engine() -> Engine:
    """Returns the process-wide engine for the configured database."""
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    """Returns the process-wide session factory."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


T = TypeVar("T")


def get_existing(db: Session, model: type[T], ident: Any, **options: Any) -> T:
    """Loads a row the caller knows exists (a foreign key or a lock just taken says so), else LookupError."""
    row = db.get(model, ident, **options)
    if row is None:  # a broken invariant, not a user's 404
        raise LookupError(f"{model.__name__} {ident!r} does not exist")
    return row


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """Returns how many rows an UPDATE or DELETE matched (Session.execute types its result as a plain Result)."""
    if not isinstance(result, CursorResult):
        raise TypeError("only a statement run on a cursor has a rowcount")
    return result.rowcount


@contextmanager
def session_scope() -> Iterator[Session]:
    """Opens a session, commits on success and rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str | None = None) -> Config:
    """Returns the Alembic configuration for this checkout, optionally for another database."""
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    if url:
        config.attributes["url"] = url
    return config


def run_migrations(url: str | None = None) -> None:
    """Upgrades the database to the newest schema."""
    from alembic import command

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
