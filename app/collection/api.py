"""The admin's batch API: create and edit prompt batches, import their prompts with hygiene, start them.

This is the JSON face of `app.collection.batches`, for scripts and the CLI's
peers; the admin pages in `app.collection.pages` call the same service functions
and share the upload handling here (`read_upload`, `run_import`). Callers use
an admin session (with X-CSRF-Token on writes) or a token with the `admin`
scope. Every user-caused problem is a 4xx naming the field; an import with
any bad line stores nothing and answers 422 with the errors by line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app import audit
from app.collection import batches
from app.collection.batches import ImportOutcome
from app.collection.prompt_import import detect_format, why_unstorable
from app.deps import AdminApi, SessionDep
from app.errors import Invalid, error_body
from app.models import PromptBatch
from app.security import spreadsheet_safe
from app.vocabulary import MAX_ID

router = APIRouter(prefix="/api/v1", tags=["batches"])

PiiPolicy = Literal["drop", "redact", "flag"]
BatchStatus = Literal["draft", "sampling", "labeling", "paused", "completed", "archived"]


def storable_text(value: str | None) -> str | None:
    """Refuses text PostgreSQL cannot store (NUL characters, lone surrogates) with a message naming why."""
    if value is not None and (why := why_unstorable(value)) is not None:
        raise ValueError(why)
    return value


class BatchFields(BaseModel):
    """Settings of a batch, as in `PromptBatch`; unknown fields are refused so a typo is not lost."""

    model_config = ConfigDict(extra="forbid")

    guidelines: str = Field(
        "", title="Guidelines", max_length=100_000, description="Markdown shown to labelers beside every task"
    )
    wants_demonstrations: bool = Field(True, title="Demonstrations", description="Labelers write ideal responses")
    wants_rankings: bool = Field(True, title="Rankings", description="Labelers rank K sampled outputs")
    allow_prompt_writing: bool = Field(False, title="Prompt writing")
    k: int = Field(4, title="K outputs to rank", ge=4, le=9, description="Outputs to rank per prompt")
    overlap: int = Field(1, title="Labelers per task", ge=1, le=20, description="Distinct labelers per task")
    extra_overlap_fraction: float = Field(
        0.0, title="Share of tasks with extra labelers", ge=0, le=1, description="Share of tasks given extra labelers"
    )
    extra_overlap: int = Field(
        1, title="Extra labelers", ge=1, le=20, description="How many extra labelers those tasks get"
    )
    temperature: float = Field(1.0, title="Temperature", ge=0, le=10)
    top_p: float = Field(0.95, title="top_p", gt=0, le=1)
    max_new_tokens: int = Field(48, title="Max new tokens", ge=1, le=4096)
    policy_version_id: int | None = Field(
        None,
        title="The model to sample from",
        ge=1,
        le=MAX_ID,
        description="Model to sample from; default: the promoted policy",
    )
    priority: int = Field(0, title="Priority", ge=-1000, le=1000, description="Higher batches are labeled first")
    pii_policy: PiiPolicy = Field(
        "drop", title="PII policy", description="What import does with prompts containing PII"
    )
    gold_share: float = Field(
        0.0,
        title="Share of gold checks",
        ge=0,
        le=1,
        description="Share of ranking leases that serve one of the batch's "
        "gold tasks (known answers) as a hidden check",
    )

    _storable_guidelines = field_validator("guidelines")(storable_text)


class BatchIn(BatchFields):
    name: str = Field(title="Name", min_length=1, max_length=200)

    _storable_name = field_validator("name")(storable_text)


class BatchPatch(BaseModel):
    """Changes to a batch; only the fields given are touched (null: unchanged, but for `policy_version_id`).

    `status` moves it through its lifecycle.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    guidelines: str | None = Field(None, max_length=100_000)
    wants_demonstrations: bool | None = None
    wants_rankings: bool | None = None
    allow_prompt_writing: bool | None = None
    k: int | None = Field(None, ge=4, le=9)
    overlap: int | None = Field(None, ge=1, le=20)
    extra_overlap_fraction: float | None = Field(None, ge=0, le=1)
    extra_overlap: int | None = Field(None, ge=1, le=20)
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    policy_version_id: int | None = Field(None, ge=1, le=MAX_ID)
    priority: int | None = Field(None, ge=-1000, le=1000)
    pii_policy: PiiPolicy | None = None
    gold_share: float | None = Field(None, ge=0, le=1)
    status: BatchStatus | None = None

    _storable_text = field_validator("name", "guidelines")(storable_text)


class BatchOut(BatchIn):
    model_config = ConfigDict(extra="ignore", from_attributes=True)

    id: int
    status: str
    created_at: datetime
    updated_at: datetime
    progress: dict[str, Any] = Field(default_factory=dict, description="prompts, samples, tasks done/needed per kind")
    hygiene: dict[str, Any] = Field(
        default_factory=dict, description="The last import's hygiene report, without the dropped lines"
    )


def hygiene_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Returns a stored hygiene report without its (long) list of dropped lines."""
    return {key: value for key, value in (report or {}).items() if key != "dropped"}


def batch_out(db: Session, batch: PromptBatch, progress: dict[str, Any] | None = None) -> BatchOut:
    """Serialises a batch with its progress."""
    if progress is None:
        progress = batches.batch_progress(db, [batch.id]).get(batch.id, {})
    out = BatchOut.model_validate(batch)
    out.progress = progress
    out.hygiene = hygiene_summary(batch.hygiene_report)
    return out


def get_batch_or_404(db: Session, batch_id: int) -> PromptBatch:
    """Loads a batch or answers 404."""
    batch = db.get(PromptBatch, batch_id)
    if batch is None:
        raise HTTPException(404, f"batch {batch_id} not found")
    return batch


def change_batch(db: Session, batch: PromptBatch, fields: dict[str, Any]) -> PromptBatch:
    """Applies edits, then a status change; a draft reaches sampling only through `start_batch`."""
    target = fields.pop("status", None)
    if fields:
        batches.update_batch(db, batch, **fields)
    if target is not None and target != batch.status:
        if batch.status == "draft" and target == "sampling":
            batches.start_batch(db, batch)
        else:
            batches.transition(db, batch, target)
    db.flush()
    return batch


@dataclass
class Upload:
    """An uploaded prompt file: its bytes and what it says about its own format."""

    data: bytes
    filename: str | None
    content_type: str | None


async def read_upload(request: Request) -> Upload:
    """Reads a prompt file from a multipart field `file` or from the raw request body."""
    content_type = request.headers.get("content-type")
    if content_type and content_type.startswith("multipart/form-data"):
        form = await request.form()  # cached: the CSRF check may have read it already
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise Invalid("file", "choose a JSON Lines or CSV file to upload")
        return Upload(await file.read(), file.filename, file.content_type)
    return Upload(await request.body(), None, content_type)


UploadDep = Annotated[Upload, Depends(read_upload)]


def run_import(
    db: Session,
    batch: PromptBatch,
    upload: Upload,
    *,
    replace: bool = False,
    fmt: Literal["jsonl", "csv"] | None = None,
    prefix_chars: int | None = 100,
    max_per_user: int | None = 200,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[ImportOutcome, int]:
    """Imports an upload into a batch all-or-nothing; returns the outcome and how many old prompts it replaced.

    The replace and the import share one savepoint, so a file with errors leaves
    the old prompts in place. Raises an AppError (the batch's status, a binary file).
    """
    if fmt is None:
        fmt = detect_format(upload.filename, upload.content_type, upload.data)
    savepoint = db.begin_nested()
    try:
        replaced = batches.replace_prompts(db, batch) if replace else 0
        outcome = batches.import_prompts(
            db,
            batch,
            upload.data,
            fmt,
            prefix_chars=prefix_chars,
            max_per_user=max_per_user,
            split_fractions=split_fractions,
        )
    except BaseException:
        savepoint.rollback()
        raise
    if outcome.ok:
        savepoint.commit()
    else:
        savepoint.rollback()
        replaced = 0
    return outcome, replaced


@router.post("/batches", status_code=201, response_model=BatchOut)
def create_batch(body: BatchIn, request: Request, db: SessionDep, principal: AdminApi):
    """Creates a draft batch; 409 when the name is taken."""
    batch = batches.create_batch(db, created_by_id=principal.user.id, **body.model_dump())
    audit.record(db, principal.user, "batch.created", f"batch {batch.id} {batch.name}", request)
    return batch_out(db, batch)


@router.get("/batches", response_model=list[BatchOut])
def list_batches(db: SessionDep, principal: AdminApi, status: Annotated[BatchStatus | None, Query()] = None):
    """Lists collection batches, newest first, with status and progress (evaluations: /api/v1/evaluations)."""
    query = select(PromptBatch).where(PromptBatch.purpose == "collection").order_by(PromptBatch.id.desc())
    if status is not None:
        query = query.where(PromptBatch.status == status)
    found = db.scalars(query).all()
    progress = batches.batch_progress(db, [b.id for b in found]) if found else {}
    return [batch_out(db, b, progress.get(b.id, {})) for b in found]


@router.get("/batches/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: int, db: SessionDep, principal: AdminApi):
    """Shows one batch with its progress and last hygiene report."""
    return batch_out(db, get_batch_or_404(db, batch_id))


@router.patch("/batches/{batch_id}", response_model=BatchOut)
def patch_batch(batch_id: int, body: BatchPatch, request: Request, db: SessionDep, principal: AdminApi):
    """Edits a batch (sampling and labeling settings only as a draft) and/or changes its status."""
    batch = get_batch_or_404(db, batch_id)
    # An explicit null leaves a setting as it is; only the sampling model has a meaningful null (the default).
    fields = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None or k == "policy_version_id"}
    change_batch(db, batch, fields)
    audit.record(db, principal.user, "batch.changed", f"batch {batch.id} {batch.name}", request, fields=sorted(fields))
    return batch_out(db, batch)


@router.post(
    "/batches/{batch_id}/prompts",
    status_code=201,
    responses={415: {"description": "Not JSON Lines or CSV"}, 422: {"description": "Errors by line"}},
)
def import_file(
    batch_id: int,
    upload: UploadDep,
    request: Request,
    db: SessionDep,
    principal: AdminApi,
    replace: Annotated[bool, Query(description="Replace the draft's prompts instead of adding to them")] = False,
    fmt: Annotated[
        Literal["jsonl", "csv"] | None,
        Query(alias="format", description="Default: from file name, content type, content"),
    ] = None,
    prefix_chars: Annotated[
        int, Query(ge=1, le=100_000, description="Shared-prefix length that marks a near duplicate")
    ] = 100,
    max_per_user: Annotated[int, Query(ge=1, description="Most prompts kept per source_user_id")] = 200,
    split: Annotated[str, Query(description="train,valid,test fractions, split by source user")] = "0.8,0.1,0.1",
):
    """Imports JSON Lines or CSV prompts all-or-nothing; answers the hygiene report, or every error by line."""
    batch = get_batch_or_404(db, batch_id)
    try:
        fractions = tuple(float(part) for part in split.split(","))
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError
    except ValueError:
        raise Invalid("split", "give three non-negative fractions that add up to 1, e.g. 0.8,0.1,0.1") from None
    outcome, replaced = run_import(
        db,
        batch,
        upload,
        replace=replace,
        fmt=fmt,
        prefix_chars=prefix_chars,
        max_per_user=max_per_user,
        split_fractions=fractions,
    )
    if not outcome.ok:
        total = outcome.errors["total"]
        message = f"the file has {total} error{'s' if total != 1 else ''}; nothing was imported"
        return JSONResponse(error_body(422, message, **outcome.errors), status_code=422)
    report = batch.hygiene_report
    audit.record(
        db,
        principal.user,
        "batch.imported",
        f"batch {batch.id} {batch.name}",
        request,
        stored=outcome.stored,
        replaced=replaced,
    )
    return {
        "batch_id": batch.id,
        "stored": outcome.stored,
        "replaced": replaced,
        "hygiene": hygiene_summary(report),
        "dropped": report.get("dropped", [])[:100],
        "dropped_csv": f"/api/v1/batches/{batch.id}/hygiene/dropped.csv",
    }


def dropped_csv(batch: PromptBatch) -> str:
    """Returns the last import's dropped lines as CSV: the full file, else the report's preview."""
    path = batches.dropped_csv_path(batch.id)
    if path.exists():
        return path.read_text(encoding="utf-8")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["line", "rule", "detail"])
    for entry in (batch.hygiene_report or {}).get("dropped", []):
        rule, detail = (spreadsheet_safe(str(entry.get(key) or "")) for key in ("rule", "detail"))
        writer.writerow([entry.get("line"), rule, detail])
    return out.getvalue()


@router.get("/batches/{batch_id}/hygiene/dropped.csv", response_class=Response)
def download_dropped(batch_id: int, db: SessionDep, principal: AdminApi):
    """Downloads every line the last import dropped, with the rule and reason."""
    batch = get_batch_or_404(db, batch_id)
    return Response(
        dropped_csv(batch),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="batch-{batch.id}-dropped.csv"'},
    )


@router.post("/batches/{batch_id}/start", response_model=BatchOut)
def start_batch(batch_id: int, request: Request, db: SessionDep, principal: AdminApi):
    """Starts a draft batch: queues sampling (or creates demonstration tasks); 409 without prompts."""
    batch = get_batch_or_404(db, batch_id)
    batches.start_batch(db, batch)
    audit.record(db, principal.user, "batch.started", f"batch {batch.id} {batch.name}", request)
    db.flush()
    return batch_out(db, batch)
