"""Export: the loop's product, demonstrations and rankings, streamed in the formats trainers read.

Three exports read the labeled data out of the database: demonstrations as
TRL prompt-completion rows, comparisons as TRL reward/DPO rows (one per pair
of outputs with different ranks, weighted 1/P so a trainer can reproduce
InstructGPT's per-ranking normalisation) and rankings as one row per ranking
with all K outputs (or, with `aggregate="consensus"`, one row per task with
the Borda consensus of its labelers' ranks). Each export is one read-only snapshot (REPEATABLE READ
on PostgreSQL, one read transaction on SQLite) streamed through a
server-side cursor, so memory stays flat whatever the size and submissions
arriving meanwhile never show up half-written. Rows come in a stable order
(ranking or demonstration id, then pair index) and each carries its own
`cursor`: passing the last cursor a client received resumes exactly after
that row. Rows are built from plain tuples and pre-encoded JSON fragments
because this path must sustain 100,000+ comparison rows per second.
"""

from __future__ import annotations

import hmac
import itertools
import re
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Engine, Select, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.errors import AppError
from app.export import schemas
from app.export.rows import (
    AGGREGATES,
    COLUMNS,
    I_RANKING,
    R_ID,
    R_TASK_ID,
    RENDER,
    Names,
    csv_line,
    labeler_pseudonym,
)
from app.models import SPLITS, Completion, Demonstration, ModelVersion, Prompt, PromptBatch, Ranking, RankingItem, User
from app.vocabulary import MAX_ID

EXPORT_KINDS = ("demonstrations", "comparisons", "rankings")
EXPORT_FORMATS = ("jsonl", "csv")


# Roughly this many characters per chunk handed to the web server: big enough that the per-chunk
# thread hop and ASGI send cost nothing per row, small enough that memory stays flat.
CHUNK_CHARS = 256 * 1024
# Rows the server-side cursor fetches per round trip.
YIELD_PER = 5000
GZIP_LEVEL = 3


class ExportError(AppError):
    """A user-caused problem with an export request (422; a bad cursor 400); `param` names the query parameter."""

    status = 422

    @property
    def param(self) -> str | None:
        return self.field


@dataclass(frozen=True)
class ExportFilters:
    """Which rows an export includes, with names already resolved to ids."""

    batch_id: int | None = None
    split: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    labeler_id: int | None = None
    model_version_id: int | None = None
    min_overlap: int | None = None
    exclude_flagged: bool = False


@dataclass(frozen=True)
class Cursor:
    """Where a resumed export continues: after row `pair_index` of unit `unit_id` (None: after the whole unit)."""

    unit_id: int
    pair_index: int | None = None


# A cursor is what a row carried: ASCII digits, at most a 64-bit id (and for comparisons ':' and a pair index).
_CURSOR = re.compile(r"([0-9]{1,19})(?::([0-9]{1,19}))?")


def parse_cursor(kind: str, text: str, schema: str = "trl") -> Cursor:
    """Parses a cursor from a row of this export: 'ranking_id:pair_index' for comparisons (and KTO rows), else an id.

    Anything else is a 400 naming `cursor`, decided here: an id past the database's 64-bit range would
    otherwise fail in the query, after the answer began.
    """
    match = _CURSOR.fullmatch(text)
    paired = kind == "comparisons" or (kind == "rankings" and schema == "kto")
    if match is None or (match.group(2) is not None and not paired):
        shape = "'<ranking_id>:<pair_index>'" if paired else "a row id"
        raise ExportError(
            "cursor", f"expected {shape} copied from the last row received, got {_shown(text)}", status=400
        )
    unit, pair = int(match.group(1)), None if match.group(2) is None else int(match.group(2))
    if unit > MAX_ID or (pair is not None and pair > MAX_ID):
        raise ExportError("cursor", f"is out of range: {_shown(text)} is past any row id", status=400)
    return Cursor(unit, pair)


def _shown(text: str) -> str:
    """Quotes a bad value for an error message, cut short: the message must not echo a megabyte back."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def resolve_filters(
    db: Connection | Session,
    kind: str,
    secret_key: str,
    *,
    batch: str | None = None,
    split: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    labeler: str | None = None,
    model_version: str | None = None,
    min_overlap: int | None = None,
    exclude_flagged: bool = False,
) -> ExportFilters:
    """Checks raw filter values and resolves names to ids; raises ExportError naming a bad parameter."""
    if kind not in EXPORT_KINDS:
        raise ExportError("kind", f"must be one of {', '.join(EXPORT_KINDS)}")
    if split is not None and split not in SPLITS:
        raise ExportError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and until <= since:
        raise ExportError("until", "must be later than since")
    if min_overlap is not None and min_overlap < 1:
        raise ExportError("min_overlap", "must be at least 1")
    if kind == "demonstrations" and model_version is not None:
        raise ExportError("model_version", "demonstrations are written by people; filter rankings or comparisons")
    if kind == "demonstrations" and exclude_flagged:
        raise ExportError("exclude_flagged", "only rankings and comparisons can be flagged")
    return ExportFilters(
        batch_id=_lookup(db, "batch", batch, PromptBatch.id, PromptBatch.name, "prompt batch"),
        split=split,
        since=since,
        until=until,
        labeler_id=_labeler_id(db, secret_key, labeler),
        model_version_id=_lookup(
            db, "model_version", model_version, ModelVersion.id, ModelVersion.name, "model version"
        ),
        min_overlap=min_overlap,
        exclude_flagged=exclude_flagged,
    )


def _lookup(
    db: Connection | Session,
    param: str,
    value: str | None,
    id_col: InstrumentedAttribute[int],
    name_col: InstrumentedAttribute[str],
    what: str,
) -> int | None:
    # A value is an id when it is all digits and such an id exists, else a name.
    if value is None:
        return None
    if "\x00" in value or len(value) > 200:
        raise ExportError(param, f"no {what} has the id or name {value[:200]!r}")
    # ASCII digits only ('²' passes isdigit() but not int()), and within the 64-bit id range.
    is_id = value.isascii() and value.isdigit() and int(value) <= MAX_ID
    found = db.execute(select(id_col).where(id_col == int(value))).scalar() if is_id else None
    if found is None:
        found = db.execute(select(id_col).where(name_col == value)).scalar()
    if found is None:
        raise ExportError(param, f"no {what} has the id or name {value!r}")
    return found


def _labeler_id(db: Connection | Session, secret_key: str, pseudonym: str | None) -> int | None:
    # Pseudonyms are one-way, so find the labeler by hashing every user id (there are few users).
    if pseudonym is None:
        return None
    for user_id in db.execute(select(User.id)).scalars():
        if hmac.compare_digest(labeler_pseudonym(secret_key, user_id), pseudonym):
            return user_id
    raise ExportError("labeler", f"no labeler has the pseudonymous id {pseudonym!r} (ids look like lab_0123...)")


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- snapshot -------------------------------------------------------------------------------------


def open_snapshot(engine: Engine) -> Connection:
    """Opens a connection of its own holding one read-only snapshot for a whole export."""
    if engine.dialect.name == "postgresql":
        conn = engine.connect().execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        conn.begin()
        return conn
    # pysqlite only opens transactions before writes; an explicit BEGIN makes every read share one
    # WAL snapshot.
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    conn.exec_driver_sql("BEGIN")
    return conn


def close_snapshot(conn: Connection) -> None:
    """Ends a snapshot opened by open_snapshot (nothing was written) and returns its connection."""
    try:
        if conn.dialect.name == "postgresql":
            conn.rollback()
        else:
            conn.exec_driver_sql("ROLLBACK")
    finally:
        conn.close()


# --- queries --------------------------------------------------------------------------------------

_r, _ri, _p, _b = Ranking.__table__, RankingItem.__table__, Prompt.__table__, PromptBatch.__table__
_c, _mv, _u, _d = Completion.__table__, ModelVersion.__table__, User.__table__, Demonstration.__table__


def _unit_conditions(kind: str, filters: ExportFilters, cursor: Cursor | None) -> list:
    unit = _d if kind == "demonstrations" else _r
    conds = []
    if filters.batch_id is not None:
        conds.append(_p.c.batch_id == filters.batch_id)
    if filters.split is not None:
        conds.append(_p.c.split == filters.split)
    if filters.since is not None:
        conds.append(unit.c.created_at >= filters.since)
    if filters.until is not None:
        conds.append(unit.c.created_at < filters.until)
    if filters.labeler_id is not None:
        conds.append(unit.c.labeler_id == filters.labeler_id)
    if filters.min_overlap is not None:
        overlapped = (
            select(unit.c.task_id)
            .group_by(unit.c.task_id)
            .having(func.count(unit.c.labeler_id.distinct()) >= filters.min_overlap)
        )
        conds.append(unit.c.task_id.in_(overlapped))
    if filters.exclude_flagged:
        conds.append(_r.c.all_unacceptable.is_(False))
    if filters.model_version_id is not None:
        item, completion = _ri.alias("mv_item"), _c.alias("mv_completion")
        conds.append(
            exists().where(
                item.c.ranking_id == _r.c.id,
                completion.c.id == item.c.completion_id,
                completion.c.model_version_id == filters.model_version_id,
            )
        )
    if cursor is not None:
        # A comparisons cursor inside a ranking re-reads that ranking and skips the pairs already sent.
        conds.append(unit.c.id >= cursor.unit_id if cursor.pair_index is not None else unit.c.id > cursor.unit_id)
    return conds


def _ranking_rows_query(filters: ExportFilters, cursor: Cursor | None, with_messages: bool = False) -> Select:
    joined = (
        _r.join(_p, _p.c.id == _r.c.prompt_id).join(_b, _b.c.id == _p.c.batch_id).join(_u, _u.c.id == _r.c.labeler_id)
    )
    return (
        select(
            _r.c.id,
            _r.c.prompt_id,
            _r.c.task_id,
            _r.c.labeler_id,
            _r.c.all_unacceptable,
            _r.c.is_gold,
            _r.c.active_seconds,
            _r.c.created_at,
            _p.c.text,
            _p.c.split,
            _p.c.batch_id,
            _b.c.name,
            _u.c.held_out,
            *([_p.c.messages] if with_messages else []),  # last, for a row schema (app.export.schemas)
        )
        .select_from(joined)
        .where(*_unit_conditions("rankings", filters, cursor))
        .order_by(_r.c.id)
    )


def _item_rows_query(kind: str, filters: ExportFilters, cursor: Cursor | None) -> Select:
    # Items come in a second statement, in ranking order, rather than joined onto each ranking row: the
    # ranking's fields (the prompt above all) would otherwise cross the wire and be decoded K times.
    columns = [
        _ri.c.ranking_id,
        _ri.c.completion_id,
        _ri.c.rank,
        _ri.c.likert,
        _ri.c.position,
        _c.c.text,
        _c.c.model_version_id,
    ]
    if kind == "rankings":
        columns.append(_ri.c.flags)  # JSON decoding costs; comparisons do not carry flags
    joined = (
        _ri.join(_r, _r.c.id == _ri.c.ranking_id)
        .join(_p, _p.c.id == _r.c.prompt_id)
        .join(_c, _c.c.id == _ri.c.completion_id)
    )
    return (
        select(*columns).select_from(joined).where(*_unit_conditions(kind, filters, cursor)).order_by(_ri.c.ranking_id)
    )


def _demonstration_rows_query(filters: ExportFilters, cursor: Cursor | None, with_messages: bool = False) -> Select:
    joined = (
        _d.join(_p, _p.c.id == _d.c.prompt_id).join(_b, _b.c.id == _p.c.batch_id).join(_u, _u.c.id == _d.c.labeler_id)
    )
    return (
        select(
            _d.c.id,
            _d.c.prompt_id,
            _d.c.task_id,
            _d.c.labeler_id,
            _d.c.active_seconds,
            _d.c.created_at,
            _d.c.text,
            _p.c.text,
            _p.c.split,
            _p.c.batch_id,
            _b.c.name,
            _u.c.held_out,
            *([_p.c.messages] if with_messages else []),  # last, for a row schema (app.export.schemas)
        )
        .select_from(joined)
        .where(*_unit_conditions("demonstrations", filters, cursor))
        .order_by(_d.c.id)
    )


def count_units(conn: Connection, kind: str, filters: ExportFilters, cursor: Cursor | None = None) -> int:
    """Counts the rankings (or demonstrations) an export will read, for a progress bar."""
    unit = _d if kind == "demonstrations" else _r
    query = select(func.count()).select_from(unit.join(_p, _p.c.id == unit.c.prompt_id))
    return conn.execute(query.where(*_unit_conditions(kind, filters, cursor))).scalar_one()


# --- streaming ------------------------------------------------------------------------------------


def _stream(conn: Connection, query: Select) -> Iterator[Any]:
    # Per statement: Connection.execution_options() would change the caller's connection for good.
    # Partitions hand over YIELD_PER rows at a time (one FETCH each), without a fetch call per row.
    result = conn.execute(query, execution_options={"stream_results": True, "yield_per": YIELD_PER})
    return itertools.chain.from_iterable(result.partitions())


def _units(
    conn: Connection, kind: str, filters: ExportFilters, cursor: Cursor | None, with_messages: bool = False
) -> Iterator[Any]:
    """Yields one unit per ranking, (ranking row, item rows), or per demonstration (its row), in export order."""
    if kind == "demonstrations":
        yield from _stream(conn, _demonstration_rows_query(filters, cursor, with_messages))
        return
    # Two cursors walk rankings and items in the same id order, merged here; the snapshot keeps them in step.
    rankings = _stream(conn, _ranking_rows_query(filters, cursor, with_messages))
    groups = itertools.groupby(_stream(conn, _item_rows_query(kind, filters, cursor)), key=itemgetter(I_RANKING))
    pending = next(groups, None)
    for ranking in rankings:
        while pending is not None and pending[0] < ranking[R_ID]:
            pending = next(groups, None)
        if pending is not None and pending[0] == ranking[R_ID]:
            yield ranking, list(pending[1])
            pending = next(groups, None)
        else:
            yield ranking, []


def _consensus_units(conn: Connection, filters: ExportFilters, cursor: Cursor | None) -> Iterator[tuple[int, list]]:
    """Yields (task_id, [(ranking row, item rows), ...]) per task in task order, after the cursor's task."""
    # A task's rankings are scattered over the ranking-id order, so they are gathered in memory first.
    by_task: dict[int, list] = {}
    for ranking, items in _units(conn, "rankings", filters, None):
        if items and (cursor is None or ranking[R_TASK_ID] > cursor.unit_id):
            by_task.setdefault(ranking[R_TASK_ID], []).append((ranking, items))
    for task_id in sorted(by_task):
        yield task_id, by_task[task_id]


def _texts(
    kind: str,
    fmt: str,
    units: Iterable[Any],
    cursor: Cursor | None,
    names: Names,
    schema: str = "trl",
    margin: str | None = None,
) -> Iterator[tuple[str, int]]:
    """Yields (text, units consumed) pieces of the export body of about CHUNK_CHARS each."""
    render = RENDER[kind, fmt]
    if schema != "trl" or margin is not None:
        render = schemas.schema_render(kind, schema, render, margin)
    # Only the ranking a comparisons cursor points into is cut; later ones start from their first pair.
    skip_id: int | None = None
    skip_through = -1
    if cursor is not None and cursor.pair_index is not None:
        skip_id, skip_through = cursor.unit_id, cursor.pair_index
    pieces = [csv_line(COLUMNS[kind])] if fmt == "csv" else []
    size = count = 0
    for unit in units:
        count += 1
        unit_id = unit[0][R_ID] if kind in ("comparisons", "rankings") else unit[0]
        text = render(unit, skip_through if unit_id == skip_id else -1, names)
        pieces.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield "".join(pieces), count
            pieces, size, count = [], 0, 0
    yield "".join(pieces), count


def export_chunks(
    conn: Connection,
    kind: str,
    filters: ExportFilters,
    *,
    secret_key: str,
    fmt: str = "jsonl",
    cursor: Cursor | None = None,
    gzip: bool = False,
    on_progress: Callable[[int], None] | None = None,
    aggregate: str = "none",
    schema: str = "trl",
    margin: str | None = None,
) -> Iterator[bytes]:
    """Streams an export read from `conn` as UTF-8 (optionally gzip) chunks; `on_progress` gets units read."""
    _check_kind_and_format(kind, fmt, aggregate, schema, margin)
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if gzip else None
    names = Names(conn, secret_key)
    if aggregate == "consensus":
        pieces = _texts("consensus", fmt, _consensus_units(conn, filters, cursor), cursor, names)
    else:
        rows = _units(conn, kind, filters, cursor, with_messages=schema != "trl")
        pieces = _texts(kind, fmt, rows, cursor, names, schema, margin)
    for text, units in pieces:
        data = text.encode()
        if compressor is not None:
            data = compressor.compress(data)
        if data:
            yield data
        if on_progress is not None and units:
            on_progress(units)
    if compressor is not None:
        yield compressor.flush()


def _check_kind_and_format(
    kind: str, fmt: str, aggregate: str = "none", schema: str = "trl", margin: str | None = None
) -> None:
    if kind not in EXPORT_KINDS:
        raise ExportError("kind", f"must be one of {', '.join(EXPORT_KINDS)}")
    if fmt not in EXPORT_FORMATS:
        raise ExportError("format", f"must be one of {', '.join(EXPORT_FORMATS)}")
    if aggregate not in AGGREGATES:
        raise ExportError("aggregate", f"must be one of {', '.join(AGGREGATES)}")
    if aggregate != "none" and kind != "rankings":
        raise ExportError("aggregate", "only the rankings export can be aggregated")
    if (problem := schemas.schema_problem(kind, fmt, schema)) is not None:
        raise ExportError("schema", problem)
    if aggregate != "none" and schema != "trl":
        raise ExportError("schema", "a consensus is exported as it is; leave schema out")
    if (problem := schemas.margin_problem(kind, fmt, margin)) is not None:
        raise ExportError("margin", problem)


class SnapshotExport:
    """One export on its own snapshot connection: filters are checked on creation, then `chunks()` streams."""

    def __init__(
        self,
        engine: Engine,
        kind: str,
        *,
        secret_key: str,
        fmt: str = "jsonl",
        cursor: str | None = None,
        gzip: bool = False,
        aggregate: str = "none",
        schema: str = "trl",
        margin: str | None = None,
        **filter_values: Any,
    ):
        _check_kind_and_format(kind, fmt, aggregate, schema, margin)
        self.kind, self.secret_key, self.fmt, self.gzip, self.aggregate = kind, secret_key, fmt, gzip, aggregate
        self.schema, self.margin = schema, margin
        self.cursor = parse_cursor(kind, cursor, schema) if cursor else None
        self.conn: Connection | None = open_snapshot(engine)
        try:
            # Resolved inside the snapshot, so a batch or labeler named here is the one exported.
            self.filters = resolve_filters(self.conn, kind, secret_key, **filter_values)
        except BaseException:
            self.close()
            raise

    def count_units(self) -> int:
        """Counts the rankings or demonstrations this export will read, in its snapshot."""
        return count_units(self._open_conn(), self.kind, self.filters, self.cursor)

    def chunks(self, on_progress: Callable[[int], None] | None = None) -> Generator[bytes, None, None]:
        """Streams the export; the snapshot closes when the stream ends, fails or is closed."""
        try:
            conn = self._open_conn()
            yield from export_chunks(
                conn,
                self.kind,
                self.filters,
                secret_key=self.secret_key,
                fmt=self.fmt,
                cursor=self.cursor,
                gzip=self.gzip,
                on_progress=on_progress,
                aggregate=self.aggregate,
                schema=self.schema,
                margin=self.margin,
            )
        finally:
            self.close()

    def _open_conn(self) -> Connection:
        # Only close() clears it, and nothing reads the export after closing it.
        if self.conn is None:
            raise RuntimeError("the export's snapshot is closed")
        return self.conn

    def close(self) -> None:
        """Ends the snapshot; safe to call twice."""
        conn, self.conn = self.conn, None
        if conn is not None:
            close_snapshot(conn)
