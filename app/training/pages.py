"""The admin's training pages: recent runs live, a run started by hand, the retrain schedule, one run's curves.

The runs page lists recent runs with progress bars that
`static/training/runs.js` keeps current by polling the runs API every 2 s,
starts a run by hand (params checked against the trainer configs), and shows
what the retrain schedule would start next; a run's page shows its curves,
error and traceback, with a cancel button. Forms share the API's helpers
(`app.training.api`).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.charts import curves, flat_metrics, fmt, pretty_json
from app.deps import AdminPage, SessionDep
from app.errors import AppError, renders_on_error
from app.models import ModelVersion, PromptBatch, TrainingRun
from app.templating import render
from app.training.api import RunRequestError, cancel_run, get_run_or_404, schedule_preview, start_manual_run
from app.training.configs import param_specs

router = APIRouter(include_in_schema=False)

MANUAL_KINDS = ("sft", "rm", "ppo", "dpo", "pretrain")
RECENT_RUNS = 50


# --- training runs -------------------------------------------------------------------------------


def _runs_page(request: Request, principal, db: Session, status_code: int = 200, **context: Any):
    found = db.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(RECENT_RUNS)).all()
    context.setdefault("form", {"kind": "sft", "params": ""})
    return render(
        request,
        "training/runs.html",
        principal,
        status_code=status_code,
        runs=found,
        schedule=schedule_preview(db),
        kinds=MANUAL_KINDS,
        params_help={kind: param_specs(kind) for kind in MANUAL_KINDS},
        fmt=fmt,
        **context,
    )


@router.get("/admin/runs")
def run_list(request: Request, principal: AdminPage, db: SessionDep):
    """Lists recent runs with live progress, the start-a-run form, and what the schedule would start next."""
    return _runs_page(request, principal, db)


def _runs_again(exc: AppError, request: Request, principal, db: Session, kind: str, params: str, **_):
    return _runs_page(
        request, principal, db, status_code=exc.status, error=str(exc), form={"kind": kind, "params": params}
    )


@router.post("/admin/runs")
@renders_on_error(_runs_again)
def run_start(
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    kind: Annotated[str, Form()],
    params: Annotated[str, Form()] = "",
):
    """Starts an SFT, RM, PPO or pretraining run by hand, with optional JSON params, and goes to its page."""
    if kind not in MANUAL_KINDS:
        raise RunRequestError("kind", f"must be one of {', '.join(MANUAL_KINDS)}")
    try:
        values = json.loads(params) if params.strip() else {}
    except json.JSONDecodeError as exc:  # parsing the form, not translating: the message says where
        where = f"line {exc.lineno} column {exc.colno}"
        raise RunRequestError("params", f"not valid JSON ({exc.msg} at {where})") from exc
    if not isinstance(values, dict):
        raise RunRequestError("params", 'must be a JSON object such as {"epochs": 2}')
    run = start_manual_run(db, kind, values, principal.user.username)
    return RedirectResponse(f"/admin/runs/{run.id}", status_code=303)


# The worker records a failure as "ExceptionName: message"; the page leads with the message, in words.
_EXCEPTION_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Cancelled): ")


def readable_reason(error: str | None) -> str:
    """Says why a run failed as a sentence: the message without the exception's class name."""
    if not error:
        return ""
    reason = _EXCEPTION_PREFIX.sub("", error.strip(), count=1).strip() or error.strip()
    reason = reason[0].upper() + reason[1:]
    return reason if reason.endswith((".", "!", "?", ")")) else f"{reason}."


def _run_page(request: Request, principal, db: Session, run: TrainingRun, status_code: int = 200, **context: Any):
    rows, other = flat_metrics(run.metrics or {})
    live = (run.metrics or {}).get("curve") or []
    latest = live[-1] if live and isinstance(live[-1], dict) else {}
    return render(
        request,
        "training/run.html",
        principal,
        status_code=status_code,
        run=run,
        reason=readable_reason(run.error),
        charts=curves(run.metrics or {}),
        metric_rows=rows,
        metric_other=pretty_json(other) if other else "",
        params=pretty_json(run.params or {}),
        latest=[(k, fmt(v)) for k, v in latest.items()],
        batch=db.get(PromptBatch, run.batch_id) if run.batch_id else None,
        output=db.get(ModelVersion, run.output_version_id) if run.output_version_id else None,
        version=db.scalar(select(ModelVersion).where(ModelVersion.training_run_id == run.id).limit(1)),
        **context,
    )


@router.get("/admin/runs/{run_id}")
def run_page(run_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Shows a run: live progress and message, curves, metrics, error and traceback, cancel button."""
    return _run_page(request, principal, db, get_run_or_404(db, run_id))


def _run_again(exc: AppError, request: Request, principal, db: Session, run_id: int, **_):
    return _run_page(request, principal, db, get_run_or_404(db, run_id), status_code=exc.status, error=str(exc))


@router.post("/admin/runs/{run_id}/cancel")
@renders_on_error(_run_again)
def run_cancel(run_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Cancels a queued or running run."""
    run = get_run_or_404(db, run_id)
    with db.begin_nested():
        cancel_run(db, run, principal.user.username)
    return RedirectResponse(f"/admin/runs/{run.id}", status_code=303)
