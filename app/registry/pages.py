"""The admin's registry pages: model versions by kind with key metrics, lineage, curves; promote, retire, roll back.

A version's page shows where it came from, the data it saw, its metrics and
curves, its blind evaluations and its behaviour (flag rates and Likert) as
labelers judged its outputs. Forms share the API's helpers
(`app.registry.api`), so both faces refuse the same things with the same
messages. Curves are SVG drawn on the server; scripts are static files, so the
CSP stays strict.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import audit
from app.charts import curves, flat_metrics, fmt, interval_bars, pretty_json
from app.deps import AdminPage, SessionDep
from app.errors import AppError, renders_on_error
from app.labeling.pages import FLAG_LABELS
from app.models import MODEL_KINDS, ModelVersion, TrainingRun
from app.quality import evaluations
from app.quality.behaviour import model_behaviour
from app.registry import versions as registry
from app.registry.api import get_version_or_404
from app.registry.versions import KEY_METRICS
from app.templating import render

router = APIRouter(include_in_schema=False)

KIND_ORDER = ("policy", "rm", "sft", "base")
KIND_TITLES = {"policy": "Policies (PPO)", "rm": "Reward models", "sft": "SFT models", "base": "Base models"}


# --- model versions ------------------------------------------------------------------------------


def _models_page(request: Request, principal, db: Session, status_code: int = 200, **context: Any):
    versions = db.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()
    names = {v.id: v.name for v in versions}
    groups = []
    for kind in KIND_ORDER:
        rows = [
            {
                "version": v,
                "parent": names.get(v.parent_id) if v.parent_id is not None else None,
                "metrics": [fmt(m) for m in registry.key_metrics(v).values()],
            }
            for v in versions
            if v.kind == kind
        ]
        groups.append(
            {
                "kind": kind,
                "title": KIND_TITLES[kind],
                "rows": rows,
                "metric_labels": [label for _, label in KEY_METRICS[kind]],
                "rollback": registry.rollback_target(db, kind),
            }
        )
    return render(request, "registry/models.html", principal, status_code=status_code, groups=groups, **context)


def _back(next_url: str, fallback: str) -> str:
    # Only this app's model pages: a posted URL must not become an open redirect.
    return next_url if next_url.startswith("/admin/models") and "//" not in next_url else fallback


@router.get("/admin/models")
def model_list(request: Request, principal: AdminPage, db: SessionDep):
    """Lists model versions by kind with status, parent, key metrics, and promote and rollback buttons."""
    return _models_page(request, principal, db)


def _models_again(exc: AppError, request: Request, principal, db: Session, **_):
    return _models_page(request, principal, db, status_code=exc.status, error=str(exc))


def _register_again(exc: AppError, request: Request, principal, db: Session, **form: Any):
    return _models_page(request, principal, db, status_code=exc.status, error=str(exc), form=form)


@router.post("/admin/models")
@renders_on_error(_register_again)
def model_register(
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    source: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    kind: Annotated[str, Form()] = "base",
    revision: Annotated[str, Form()] = "",
    promote: Annotated[bool, Form()] = False,
):
    """Registers a model from a folder or hub id (the API's code path); its page shows the validation."""
    with db.begin_nested():
        version = registry.register_model(db, source, name, kind=kind, revision=revision or None, promote=promote)
        audit.record(
            db, principal.user, "model.registered", f"model {version.id} {version.name}", request, source=source
        )
    return RedirectResponse(f"/admin/models/{version.id}", status_code=303)


@router.post("/admin/models/rollback")
@renders_on_error(_models_again)
def model_rollback(request: Request, principal: AdminPage, db: SessionDep, kind: Annotated[str, Form()]):
    """Promotes the version of a kind promoted before the current one."""
    if kind not in MODEL_KINDS:
        raise HTTPException(422, f"kind: must be one of {', '.join(MODEL_KINDS)}")
    with db.begin_nested():
        version = registry.rollback(db, kind)
        audit.record(db, principal.user, "model.rolled_back", f"model {version.id} {version.name}", request, kind=kind)
    return RedirectResponse(f"/admin/models?rolled_back={version.id}", status_code=303)


@router.get("/admin/models/{version_id}")
def model_page(version_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Shows a version: lineage as links, data snapshot, all metrics and their curves."""
    return _model_page(request, principal, db, get_version_or_404(db, version_id))


def _model_page(
    request: Request, principal, db: Session, version: ModelVersion, status_code: int = 200, **context: Any
):
    rows, other = flat_metrics(version.metrics or {})
    snapshot_rows, snapshot_other = flat_metrics(version.data_snapshot or {})
    run = db.get(TrainingRun, version.training_run_id) if version.training_run_id else None
    found = evaluations.for_model(db, version.id)
    behaviour = model_behaviour(db, version.id) if version.kind != "rm" else None
    return render(
        request,
        "registry/model.html",
        principal,
        status_code=status_code,
        version=version,
        lineage=registry.lineage(db, version),
        run=run,
        metric_rows=rows,
        metric_other=pretty_json(other) if other else "",
        snapshot_rows=snapshot_rows,
        snapshot_other=pretty_json(snapshot_other) if snapshot_other else "",
        charts=curves(version.metrics or {}),
        evaluations=found,
        behaviour=behaviour,
        flag_labels=FLAG_LABELS,
        eval_chart=interval_bars(
            [
                {
                    "label": f"#{e['evaluation_id']} vs {e['opponent']['name']}",
                    "value": e["result"]["win_rate"],
                    "low": e["result"]["low"],
                    "high": e["result"]["high"],
                    "n": e["result"]["n"],
                }
                for e in found[:20]
            ],
            reference=0.5,
        ),
        flag_chart=interval_bars(
            [
                {"label": FLAG_LABELS[name], "value": e.value, "low": e.low, "high": e.high, "n": e.n}
                for name, e in behaviour.flags.items()
            ]
        )
        if behaviour and behaviour.n_outputs
        else None,
        **context,
    )


def _model_again(exc: AppError, request: Request, principal, db: Session, version_id: int, **_):
    version = get_version_or_404(db, version_id)
    db.refresh(version)  # as the failed savepoint left it
    return _model_page(request, principal, db, version, status_code=exc.status, error=str(exc))


def _promote_again(exc: AppError, next_url: str, **route):
    # Back on the page the button was on: the version's own page, or the list.
    if _back(next_url, "/admin/models") == f"/admin/models/{route['version_id']}":
        return _model_again(exc, **route)
    return _models_again(exc, **route)


@router.post("/admin/models/{version_id}/promote")
@renders_on_error(_promote_again)
def model_promote(
    version_id: int,
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    next_url: Annotated[str, Form(alias="next")] = "/admin/models",
):
    """Promotes a ready version; the previously promoted one of its kind becomes ready."""
    version = get_version_or_404(db, version_id)
    if version.status != "promoted":
        with db.begin_nested():
            registry.promote(db, version)
            audit.record(db, principal.user, "model.promoted", f"model {version.id} {version.name}", request)
    return RedirectResponse(_back(next_url, "/admin/models"), status_code=303)


@router.post("/admin/models/{version_id}/retire")
@renders_on_error(_model_again)
def model_retire(version_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Retires a ready version."""
    version = get_version_or_404(db, version_id)
    with db.begin_nested():
        registry.retire(db, version)
        audit.record(db, principal.user, "model.retired", f"model {version.id} {version.name}", request)
    return RedirectResponse(f"/admin/models/{version.id}", status_code=303)
