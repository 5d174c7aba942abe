"""The admin's batch pages: list batches with progress, create one, upload its prompts, start it, watch it.

The pages call the same service functions as the batch API
(`app.collection.api` shares its form-free pieces: upload import,
status changes), so both faces refuse the same things with the same
messages. Forms post back and redirect (303) to the batch page on success;
on a user error the page is shown again with the message and a 4xx. Charts
are SVG drawn on the server: no script is needed and the CSP stays strict.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import RedirectResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import audit
from app.collection import batches
from app.collection.api import BatchIn, Upload, change_batch, get_batch_or_404, run_import
from app.collection.prompt_import import CATEGORIES
from app.deps import AdminPage, SessionDep
from app.errors import AppError, FormInvalid, Invalid, renders_on_error, validated_form
from app.models import Assignment, ModelVersion, Prompt, PromptBatch, Task, User, utcnow
from app.templating import plural, render
from app.vocabulary import USABLE_STATUSES

router = APIRouter(include_in_schema=False)

RATE_WINDOW = timedelta(hours=24)
TIME_BINS = [(0, 10), (10, 30), (30, 60), (60, 120), (120, 300), (300, None)]  # seconds per task
REPORT_RULES = [
    ("pii_dropped", "PII (dropped)"),
    ("pii_redacted", "PII (redacted)"),
    ("pii_flagged", "PII (flagged, kept)"),
    ("duplicates", "Exact duplicates"),
    ("duplicates_of_earlier_batches", "… of which in earlier batches"),
    ("shared_prefix", "Shared long prefix"),
    ("shared_prefix_with_earlier_batches", "… of which in earlier batches"),
    ("over_user_limit", "Over the per-user limit"),
]
ACTIONS = {
    "paused": "Pause",
    "sampling": "Resume sampling",
    "labeling": "Resume labeling",
    "completed": "Mark completed",
    "archived": "Archive",
}


def _labels_by_batch(db: Session, since) -> tuple[dict[int, int], dict[int, int]]:
    """Returns, per batch, labels submitted since `since` and distinct labelers active since then."""
    recent, labelers = {}, {}
    for batch_id, n, people in db.execute(
        select(
            Task.batch_id,
            func.count().filter(Assignment.state == "submitted"),
            func.count(Assignment.labeler_id.distinct()),
        )
        .join(Task, Task.id == Assignment.task_id)
        .where(Assignment.leased_at >= since)
        .group_by(Task.batch_id)
    ):
        recent[batch_id], labelers[batch_id] = n, people
    return recent, labelers


SKIP_NOTES_SHOWN = 20  # the latest notes on the batch page


def _eta_hours(progress: dict[str, Any], recent_labels: int) -> float | None:
    remaining = sum(t["needed"] - t["done"] for t in progress.get("tasks", {}).values())
    if remaining <= 0 or recent_labels <= 0:
        return None
    return remaining / (recent_labels / (RATE_WINDOW.total_seconds() / 3600))


def _line_chart(points: Sequence[tuple[float, float]], width: int = 640, height: int = 160) -> dict[str, Any]:
    """Scales (x, y) points into an SVG polyline of the given size."""
    if len(points) < 2:
        return {}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y1 = min(xs), max(xs), max(ys) or 1
    span = (x1 - x0) or 1
    coords = " ".join(f"{(x - x0) / span * width:.1f},{height - y / y1 * height:.1f}" for x, y in points)
    return {"points": coords, "width": width, "height": height, "max": int(y1)}


def batch_activity(db: Session, batch_id: int) -> dict[str, Any]:
    """Gathers a batch's labeling activity: progress over time, per-labeler throughput, time per task, skips."""
    rows = db.execute(
        select(
            User.username,
            Assignment.state,
            Assignment.finished_at,
            Assignment.active_seconds,
            Assignment.skip_reason,
            Assignment.skip_note,
            Assignment.task_id,
        )
        .join(Task, Task.id == Assignment.task_id)
        .join(User, User.id == Assignment.labeler_id)
        .where(Task.batch_id == batch_id, Assignment.state.in_(("submitted", "skipped")))
        .order_by(Assignment.finished_at)
    ).all()
    per_labeler: dict[str, dict[str, Any]] = defaultdict(lambda: {"submitted": 0, "skipped": 0, "seconds": []})
    skips: Counter[str] = Counter()
    notes: list[dict[str, Any]] = []  # what labelers wrote when they skipped: often a broken prompt or output
    done_times, seconds = [], []
    for username, state, finished_at, active, reason, note, task_id in rows:
        entry = per_labeler[username]
        if state == "skipped":
            entry["skipped"] += 1
            skips[reason or "unspecified"] += 1
            if note and note.strip():
                notes.append(
                    {"username": username, "reason": reason, "note": note, "task_id": task_id, "at": finished_at}
                )
            continue
        entry["submitted"] += 1
        entry["seconds"].append(active or 0.0)
        seconds.append(active or 0.0)
        if finished_at is not None:
            done_times.append(finished_at)
    labelers = [
        {
            "username": name,
            "submitted": e["submitted"],
            "skipped": e["skipped"],
            "median_seconds": statistics.median(e["seconds"]) if e["seconds"] else None,
        }
        for name, e in sorted(per_labeler.items(), key=lambda item: -item[1]["submitted"])
    ]
    step = max(1, len(done_times) // 100)  # at most ~100 points on the chart
    points = [(t.timestamp(), i + 1) for i, t in enumerate(done_times) if i % step == 0 or i == len(done_times) - 1]
    histogram = [sum(1 for s in seconds if lo <= s and (hi is None or s < hi)) for lo, hi in TIME_BINS]
    top = max(histogram) or 1
    bars = [
        {"label": f"{lo}–{hi}s" if hi else f"{lo}s+", "count": n, "height": round(n / top * 120, 1)}
        for (lo, hi), n in zip(TIME_BINS, histogram, strict=True)
    ]
    return {
        "labelers": labelers,
        "skips": skips.most_common(),
        "skip_notes": notes[-SKIP_NOTES_SHOWN:][::-1],
        "histogram": bars if seconds else [],
        "chart": _line_chart(points),
        "median_seconds": statistics.median(seconds) if seconds else None,
        "first": done_times[0] if done_times else None,
        "last": done_times[-1] if done_times else None,
    }


def _models(db: Session) -> Sequence[ModelVersion]:
    return db.scalars(
        select(ModelVersion)
        .where(ModelVersion.kind != "rm", ModelVersion.status.in_(USABLE_STATUSES))
        .order_by(ModelVersion.id.desc())
    ).all()


def _batch_page(request: Request, principal, db: Session, batch: PromptBatch, status_code: int = 200, **context: Any):
    progress = batches.batch_progress(db, [batch.id]).get(batch.id, {})
    recent, labelers = _labels_by_batch(db, utcnow() - RATE_WINDOW)
    report = batch.hygiene_report or {}
    return render(
        request,
        "collection/batch.html",
        principal,
        status_code=status_code,
        batch=batch,
        progress=progress,
        activity=batch_activity(db, batch.id),
        eta_hours=_eta_hours(progress, recent.get(batch.id, 0)),
        active_labelers=labelers.get(batch.id, 0),
        report=report,
        rules=REPORT_RULES,
        models=_models(db),
        actions=[
            (s, ACTIONS[s])
            for s in sorted(batches.TRANSITIONS[batch.status])
            if s in ACTIONS and not (batch.status == "draft" and s == "sampling")
        ],
        dropped_count=len(report.get("dropped", [])),
        categories=CATEGORIES,
        import_message=_import_message(request),
        **context,
    )


def _count(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "")
    return int(value) if value.isdigit() else None


def _import_message(request: Request) -> str:
    """Says what the last import did, from the counts the upload's redirect carries."""
    imported = _count(request, "imported")
    if imported is None:
        return ""
    removed, before = _count(request, "removed") or 0, _count(request, "before") or 0
    if removed:
        return f"Removed the {plural(removed, 'prompt')} the batch had and imported {plural(imported, 'prompt')}."
    if before:
        return (
            f"Imported {plural(imported, 'prompt')}, added to the {before:,} already in the batch "
            f"({before + imported:,} in all)."
        )
    return f"Imported {plural(imported, 'prompt')}."


def _form_fields(form: dict[str, str]) -> dict[str, Any]:
    """Turns the settings form into batch fields; blank optional numbers mean 'default'."""
    # Disabled inputs (settings a started batch may no longer change) are not submitted at all.
    mix = form.pop("task_mix", None)
    writing = form.pop("allow_prompt_writing", None)
    fields: dict[str, Any] = {k: v for k, v in form.items() if v != "" or k in ("name", "guidelines")}
    if mix is not None:
        fields["wants_demonstrations"] = mix in ("both", "demonstrations")
        fields["wants_rankings"] = mix in ("both", "rankings")
        fields["allow_prompt_writing"] = writing == "on"
    if form.get("policy_version_id") == "":
        fields["policy_version_id"] = None
    return fields


def _validated(fields: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validates form fields with the API's model, raising FormInvalid with every bad field, in words."""
    data = dict(fields)
    if partial:
        data.setdefault("name", "placeholder")
    out = validated_form(BatchIn, data).model_dump()
    return {k: out[k] for k in fields} if partial else out


SettingsForm = dict[str, str]


async def _settings_form(request: Request) -> SettingsForm:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}


SettingsDepForm = Annotated[SettingsForm, Depends(_settings_form)]


@router.get("/admin/batches")
def batch_list(request: Request, principal: AdminPage, db: SessionDep):
    """Lists batches with status, prompts, samples, labels done/needed per kind, active labelers and ETA."""
    found = db.scalars(
        select(PromptBatch)
        .where(PromptBatch.purpose == "collection")
        .order_by(PromptBatch.priority.desc(), PromptBatch.id.desc())
    ).all()
    progress = batches.batch_progress(db, [b.id for b in found]) if found else {}
    recent, labelers = _labels_by_batch(db, utcnow() - RATE_WINDOW)
    rows = [
        {
            "batch": b,
            "progress": progress.get(b.id, {}),
            "labelers": labelers.get(b.id, 0),
            "eta_hours": _eta_hours(progress.get(b.id, {}), recent.get(b.id, 0)),
        }
        for b in found
    ]
    return render(request, "collection/batches.html", principal, rows=rows)


def _defaults() -> dict[str, Any]:
    """The settings a new batch stores when the form leaves them alone, so the form can show them."""
    fields = {name: info.default for name, info in BatchIn.model_fields.items() if name != "name"}
    return fields | {"task_mix": "both"}


def _problems(exc: AppError) -> dict[str, Any]:
    """What a form shows of an error: every problem, in words, for a form's validation; else the message."""
    if isinstance(exc, FormInvalid):
        return {"problems": [sentence for _, sentence in exc.problems], "error": ""}
    return {"problems": [], "error": str(exc)}


@router.get("/admin/batches/new")
def new_batch_form(request: Request, principal: AdminPage, db: SessionDep):
    """Shows the form that creates a batch, filled with the defaults a batch gets."""
    return render(request, "collection/batch_new.html", principal, form=_defaults(), models=_models(db), error="")


def _new_batch_again(exc: AppError, request: Request, principal, db: Session, form: SettingsForm, **_):
    return render(
        request,
        "collection/batch_new.html",
        principal,
        status_code=exc.status,
        form=_defaults() | form,  # what was typed, as typed
        models=_models(db),
        **_problems(exc),
    )


@router.post("/admin/batches/new")
@renders_on_error(_new_batch_again)
def new_batch(request: Request, principal: AdminPage, db: SessionDep, form: SettingsDepForm):
    """Creates a draft batch and goes to its page."""
    fields = _validated(_form_fields(dict(form)), partial=False)
    with db.begin_nested():
        batch = batches.create_batch(db, created_by_id=principal.user.id, **fields)
        audit.record(db, principal.user, "batch.created", f"batch {batch.id} {batch.name}", request)
    return RedirectResponse(f"/admin/batches/{batch.id}", status_code=303)


@router.get("/admin/batches/{batch_id}")
def batch_page(batch_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Shows a batch: settings, prompt upload, hygiene report, progress and labeling activity."""
    return _batch_page(request, principal, db, get_batch_or_404(db, batch_id))


def _batch_again(exc: AppError, request: Request, principal, db: Session, batch_id: int, **route: Any):
    batch = get_batch_or_404(db, batch_id)
    db.refresh(batch)  # as the failed savepoint left it
    typed = route.get("form")  # the settings form: shown again as typed, over the stored settings
    values = None
    if typed is not None:
        values = {name: getattr(batch, name) for name in BatchIn.model_fields} | typed
        if "task_mix" in typed:  # a draft's form: an unticked box is not submitted at all
            values["allow_prompt_writing"] = typed.get("allow_prompt_writing", "")
    return _batch_page(request, principal, db, batch, status_code=exc.status, settings_values=values, **_problems(exc))


@router.post("/admin/batches/{batch_id}/settings")
@renders_on_error(_batch_again)
def batch_settings(batch_id: int, request: Request, principal: AdminPage, db: SessionDep, form: SettingsDepForm):
    """Saves a batch's settings (sampling and labeling settings only while it is a draft)."""
    batch = get_batch_or_404(db, batch_id)
    fields = _validated(_form_fields(dict(form)), partial=True)
    with db.begin_nested():
        change_batch(db, batch, fields)
        audit.record(
            db, principal.user, "batch.changed", f"batch {batch.id} {batch.name}", request, fields=sorted(fields)
        )
    return RedirectResponse(f"/admin/batches/{batch.id}", status_code=303)


@router.post("/admin/batches/{batch_id}/prompts")
@renders_on_error(_batch_again)
def batch_upload(
    batch_id: int,
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    file: Annotated[UploadFile | None, File()] = None,
    replace: Annotated[str, Form()] = "",
    prefix_chars: Annotated[int, Form(ge=1, le=100_000)] = 100,
    max_per_user: Annotated[int, Form(ge=1)] = 200,
):
    """Imports an uploaded prompt file; lists its errors by line when it has any."""
    batch = get_batch_or_404(db, batch_id)
    if file is None or not file.filename:
        raise Invalid("file", "choose a JSON Lines or CSV file to upload")
    upload = Upload(file.file.read(), file.filename, file.content_type)
    before = db.scalar(select(func.count()).where(Prompt.batch_id == batch.id)) or 0
    outcome, replaced = run_import(
        db, batch, upload, replace=replace == "on", prefix_chars=prefix_chars, max_per_user=max_per_user
    )
    if not outcome.ok:
        return _batch_page(
            request,
            principal,
            db,
            batch,
            status_code=422,
            upload_errors=outcome.errors,
            upload_name=file.filename,
            error=f"{file.filename}: {outcome.errors['total']} errors; nothing was imported",
        )
    audit.record(
        db,
        principal.user,
        "batch.imported",
        f"batch {batch.id} {batch.name}",
        request,
        stored=outcome.stored,
        replaced=replaced,
    )
    # Appending is the default; replacing is an explicit, confirmed choice, and the message says what it removed.
    counts = f"imported={outcome.stored}" + (f"&removed={replaced}" if replaced else f"&before={before}" * bool(before))
    return RedirectResponse(f"/admin/batches/{batch.id}?{counts}", status_code=303)


@router.post("/admin/batches/{batch_id}/start")
@renders_on_error(_batch_again)
def batch_start(batch_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Starts a draft batch."""
    batch = get_batch_or_404(db, batch_id)
    with db.begin_nested():
        batches.start_batch(db, batch)
        audit.record(db, principal.user, "batch.started", f"batch {batch.id} {batch.name}", request)
    return RedirectResponse(f"/admin/batches/{batch.id}", status_code=303)


@router.post("/admin/batches/{batch_id}/status")
@renders_on_error(_batch_again)
def batch_status(batch_id: int, request: Request, principal: AdminPage, db: SessionDep, status: Annotated[str, Form()]):
    """Pauses, resumes, completes or archives a batch."""
    batch = get_batch_or_404(db, batch_id)
    if status not in ACTIONS:
        raise HTTPException(422, f"status: unknown status {status!r}")
    with db.begin_nested():
        batches.transition(db, batch, status)
        audit.record(db, principal.user, f"batch.{status}", f"batch {batch.id} {batch.name}", request)
    return RedirectResponse(f"/admin/batches/{batch.id}", status_code=303)
