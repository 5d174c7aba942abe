"""The export API: demonstrations, comparisons and rankings for `export:read`.

Each endpoint streams JSON Lines (default) or CSV, optionally gzip, from a
snapshot of its own (see app.export.stream); the request's session only
authenticates. Filters are checked before the first byte is sent, so a bad
one is a 422 naming the parameter rather than a broken 200. Every row has
a `cursor`: after a broken download, pass the last complete row's cursor
as `?cursor=` (with the same filters) to continue without gaps or repeats.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from app import audit
from app.config import get_settings
from app.deps import ExportReader, Principal, SessionDep
from app.export.stream import SnapshotExport

router = APIRouter()
export_router = APIRouter(prefix="/api/v1/export", tags=["export"])

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


class ExportQuery(BaseModel):
    """Query parameters shared by the three exports; unknown parameters are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["jsonl", "csv"] = Field("jsonl", description="JSON Lines (default) or CSV with a header row.")
    compress: Literal["gzip", "none"] = Field(
        "none", description="'gzip' sends a .gz file; with Accept-Encoding: gzip the transfer is compressed anyway."
    )
    batch: str | None = Field(None, description="Prompt batch id or name.")
    split: Literal["train", "valid", "test"] | None = Field(None, description="The prompts' split.")
    since: datetime | None = Field(None, description="Submitted at or after this time (ISO 8601; naive = UTC).")
    until: datetime | None = Field(None, description="Submitted before this time.")
    labeler: str | None = Field(None, description="Pseudonymous labeler id as it appears in exports (lab_...).")
    model_version: str | None = Field(
        None, description="Rankings with at least one output from this model version (id or name)."
    )
    min_overlap: int | None = Field(
        None, ge=1, le=1000, description="Only tasks labeled by at least this many labelers."
    )
    exclude_flagged: bool = Field(False, description="Drop rankings whose outputs were all marked unacceptable.")
    cursor: str | None = Field(None, description="Resume after the row carrying this cursor.")
    row_schema: str = Field(
        "trl",
        alias="schema",
        description="Comparisons and demonstrations: the row shape. 'trl' (default: TRL's standard format, the "
        "prompt as text), 'trl_chat' (TRL's conversational format: messages), 'openai' (OpenAI fine-tuning JSONL: "
        "preference rows for comparisons, chat rows for demonstrations) or 'hh_rlhf' (Human:/Assistant: "
        "transcripts). Rankings: 'kto' (TRL unpaired rows with a boolean label, one per output the ranking and "
        "Likert label) or 'kway' (lossless: the conversation and every output). JSON Lines only, except 'trl'.",
    )
    margin: str | None = Field(
        None,
        description="Comparisons, JSON Lines: add a `margin` per pair, 'rank' (rejected_rank - chosen_rank) or "
        "'likert' (chosen_likert - rejected_likert).",
    )
    aggregate: Literal["none", "consensus"] = Field(
        "none",
        description="Rankings only: 'consensus' gives one row per task with its labelers' ranks and their "
        "Borda consensus (consensus_rank per completion); the cursor is then the task id.",
    )


def _accepts_gzip(header: str) -> bool:
    """Tells whether an Accept-Encoding header lists gzip with a non-zero quality."""
    for part in header.lower().split(","):
        name, *params = (piece.strip() for piece in part.split(";"))
        if name in ("gzip", "x-gzip"):
            quality = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                return float(quality) > 0
            except ValueError:
                return False
    return False


class ExportResponse(StreamingResponse):
    """A streamed export that ends its snapshot however the response ends, hang-ups included."""

    def __init__(self, first: bytes, chunks: Generator[bytes, None, None], **kwargs: Any):
        super().__init__(itertools.chain([first] if first else [], chunks), **kwargs)
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # When the client hangs up, Starlette abandons the iterator mid-stream and only the garbage
            # collector would close it, leaving the snapshot's transaction open until then. A chunk
            # being read in the thread pool has finished by now (thread calls are not abandoned).
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.chunks.close)


def _export(kind: str, query: ExportQuery, request: Request, db: SessionDep, principal: Principal) -> StreamingResponse:
    settings = get_settings()
    file_gzip = query.compress == "gzip"
    transfer_gzip = not file_gzip and _accepts_gzip(request.headers.get("accept-encoding", ""))
    filters = query.model_dump(exclude={"format", "compress", "cursor", "aggregate", "row_schema", "margin"})
    export = SnapshotExport(
        db.get_bind().engine,
        kind,
        secret_key=settings.secret_key,
        fmt=query.format,
        cursor=query.cursor,
        gzip=file_gzip or transfer_gzip,
        aggregate=query.aggregate,
        schema=query.row_schema,
        margin=query.margin,
        **filters,
    )
    chunks = export.chunks()
    # The first chunk is read before answering, so a database error is a 500, not a truncated 200.
    first = next(chunks, b"")
    # Recorded once the export is known to start (its filters and cursor were accepted).
    audit.record(
        db,
        principal.user,
        f"export.{kind}",
        kind,
        request,
        format=query.format,
        filters={
            k: v
            for k, v in query.model_dump(mode="json", exclude={"format", "cursor"}).items()
            if v not in (None, "", [])
        },
        resumed=query.cursor is not None,
    )
    filename = f"{kind}.{query.format}" + (".gz" if file_gzip else "")
    headers = {
        "content-disposition": f'attachment; filename="{filename}"',
        "cache-control": "no-store",
        "vary": "accept-encoding",
        "x-export-cursor-field": "cursor",
    }
    if transfer_gzip:
        headers["content-encoding"] = "gzip"
    media_type = "application/gzip" if file_gzip else MEDIA_TYPES[query.format]
    return ExportResponse(first, chunks, media_type=media_type, headers=headers)


Params = Annotated[ExportQuery, Query()]
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The export, streamed; every row carries its `cursor`.",
        "content": {"application/x-ndjson": {}, "text/csv": {}, "application/gzip": {}},
    },
    400: {"description": "A malformed or out-of-range `cursor`; `field` is `cursor`."},
    422: {"description": "A bad filter; `detail` starts with the parameter's name."},
}


@export_router.get("/demonstrations", response_class=ExportResponse, responses=RESPONSES, status_code=200)
def export_demonstrations(query: Params, request: Request, db: SessionDep, principal: ExportReader):
    """Streams demonstrations as TRL prompt-completion rows (`prompt`, `completion`, provenance, `cursor`)."""
    return _export("demonstrations", query, request, db, principal)


@export_router.get("/comparisons", response_class=ExportResponse, responses=RESPONSES, status_code=200)
def export_comparisons(query: Params, request: Request, db: SessionDep, principal: ExportReader):
    """Streams one TRL reward/DPO row (`prompt`, `chosen`, `rejected`, ...) per pair of differently ranked outputs."""
    return _export("comparisons", query, request, db, principal)


@export_router.get("/rankings", response_class=ExportResponse, responses=RESPONSES, status_code=200)
def export_rankings(query: Params, request: Request, db: SessionDep, principal: ExportReader):
    """Streams one row per ranking with all K outputs, ranks, Likert, flags, display order (or per task: consensus)."""
    return _export("rankings", query, request, db, principal)


# --- webhooks -------------------------------------------------------------------------------------


router.include_router(export_router)
