"""The admin's registry and training pages: model versions with lineage and metrics, training runs live.

The model pages list versions by kind with their key metrics, promote one,
roll a kind back, and show a version's lineage, data snapshot, metrics and
curves. The run pages list recent runs with progress bars that
`static/runs.js` keeps current by polling the runs API every 2 s, start a
run by hand, show what the retrain schedule would start next, and show one
run's curves, error and traceback, with a cancel button. Forms share the
API's helpers (`app.registry.api`), so both faces refuse the same
things with the same messages. Curves are SVG drawn on the server; scripts
are static files, so the CSP stays strict.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import AdminPage, SessionDep
from app.errors import AppError, renders_on_error
from app.models import MODEL_KINDS, ModelVersion, PromptBatch, TrainingRun
from app.charts import interval_bars
from app.labeling.pages import FLAG_LABELS
from app.registry.api import (
    RunRequestError,
    cancel_run,
    get_run_or_404,
    get_version_or_404,
    schedule_preview,
    start_manual_run,
)
from app.templating import render
from app.quality import evaluations
from app.registry import versions as registry
from app.quality.behaviour import model_behaviour
from app.registry.versions import KEY_METRICS
from app.training.configs import param_specs

router = APIRouter(include_in_schema=False)

KIND_ORDER = ("policy", "rm", "sft", "base")
KIND_TITLES = {"policy": "Policies (PPO)", "rm": "Reward models", "sft": "SFT models", "base": "Base models"}
MANUAL_KINDS = ("sft", "rm", "ppo", "pretrain")
# Bookkeeping columns of a step curve, not quantities worth a chart.
NOT_CHARTED = {"step", "epoch", "rows", "lr", "kl_coef"}
RECENT_RUNS = 50


# --- numbers and charts --------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """Formats a metric for a table cell: four significant digits for floats, thousands for ints."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def line_chart(points: list[tuple[float, float]], width: int = 640, height: int = 160) -> dict[str, Any] | None:
    """Scales (x, y) points into an SVG polyline between the data's own minimum and maximum."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y0 == y1:  # a flat line sits in the middle rather than on an axis
        y0, y1 = y0 - 0.5, y1 + 0.5
    x_span, y_span = (x1 - x0) or 1, y1 - y0
    coords = " ".join(f"{(x - x0) / x_span * width:.1f},{height - (y - y0) / y_span * height:.1f}" for x, y in points)
    return {"points": coords, "width": width, "height": height, "x_min": fmt(x0), "x_max": fmt(x1),
            "y_min": fmt(y0), "y_max": fmt(y1)}


def curves(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Finds every curve in a run's or version's metrics and draws each as a chart.

    Two shapes occur: rows of numbers per step (`curve`, written live by the
    worker; `log`, PPO's per-iteration record) and `<name>_curve` lists of one
    number per epoch in the final metrics (PPO's per-iteration ones repeat `log`).
    """
    charts: list[dict[str, Any]] = []
    drawn: set[str] = set()
    for key, x_label in (("curve", "step"), ("log", "iteration")):
        rows = [r for r in metrics.get(key) or [] if isinstance(r, dict)] if isinstance(metrics.get(key), list) else []
        names = list(dict.fromkeys(
            name for r in rows for name, v in r.items() if _number(v) and name not in NOT_CHARTED))
        for name in names:
            points = [(float(r.get("step", i + 1)), float(r[name])) for i, r in enumerate(rows) if _number(r.get(name))]
            chart = line_chart(points)
            if chart:
                charts.append({"name": name, "title": name.replace("_", " "), "x_label": x_label,
                               "last": fmt(points[-1][1]), "chart": chart})
                drawn.add(name)
    for key, values in metrics.items():
        name = key.removesuffix("_curve")
        if not key.endswith("_curve") or name in drawn or not isinstance(values, list):
            continue
        points = [(float(i + 1), float(v)) for i, v in enumerate(values) if _number(v)]
        chart = line_chart(points)
        if chart:
            charts.append({"name": name, "title": name.replace("_", " "), "x_label": "epoch",
                           "last": fmt(points[-1][1]), "chart": chart})
    return charts


def flat_metrics(metrics: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Splits metrics into (name, formatted value) rows for scalars, nested one level deep, and the rest."""
    rows: list[tuple[str, str]] = []
    other: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in ("curve", "log") or key.endswith("_curve"):
            continue  # drawn as charts
        if value is None or isinstance(value, (int, float, str, bool)):
            rows.append((key, fmt(value)))
        elif isinstance(value, dict) and all(v is None or isinstance(v, (int, float, str, bool))
                                             for v in value.values()):
            rows.extend((f"{key}.{sub}", fmt(v)) for sub, v in value.items())
        else:
            other[key] = value
    return rows, other


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


# --- model versions ------------------------------------------------------------------------------


def _models_page(request: Request, principal, db: Session, status_code: int = 200, **context: Any):
    versions = db.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()
    names = {v.id: v.name for v in versions}
    groups = []
    for kind in KIND_ORDER:
        rows = [{"version": v, "parent": names.get(v.parent_id) if v.parent_id is not None else None,
                 "metrics": [fmt(m) for m in registry.key_metrics(v).values()]}
                for v in versions if v.kind == kind]
        groups.append({"kind": kind, "title": KIND_TITLES[kind], "rows": rows,
                       "metric_labels": [label for _, label in KEY_METRICS[kind]],
                       "rollback": registry.rollback_target(db, kind)})
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


@router.post("/admin/models/rollback")
@renders_on_error(_models_again)
def model_rollback(request: Request, principal: AdminPage, db: SessionDep, kind: Annotated[str, Form()]):
    """Promotes the version of a kind promoted before the current one."""
    if kind not in MODEL_KINDS:
        raise HTTPException(422, f"kind: must be one of {', '.join(MODEL_KINDS)}")
    with db.begin_nested():
        version = registry.rollback(db, kind)
    return RedirectResponse(f"/admin/models?rolled_back={version.id}", status_code=303)


@router.get("/admin/models/{version_id}")
def model_page(version_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Shows a version: lineage as links, data snapshot, all metrics and their curves."""
    return _model_page(request, principal, db, get_version_or_404(db, version_id))


def _model_page(request: Request, principal, db: Session, version: ModelVersion, status_code: int = 200,
                **context: Any):
    rows, other = flat_metrics(version.metrics or {})
    snapshot_rows, snapshot_other = flat_metrics(version.data_snapshot or {})
    run = db.get(TrainingRun, version.training_run_id) if version.training_run_id else None
    found = evaluations.for_model(db, version.id)
    behaviour = model_behaviour(db, version.id) if version.kind != "rm" else None
    return render(
        request, "registry/model.html", principal, status_code=status_code, version=version,
        lineage=registry.lineage(db, version), run=run, metric_rows=rows, metric_other=_pretty(other) if other else "",
        snapshot_rows=snapshot_rows, snapshot_other=_pretty(snapshot_other) if snapshot_other else "",
        charts=curves(version.metrics or {}), evaluations=found, behaviour=behaviour,
        flag_labels=FLAG_LABELS,
        eval_chart=interval_bars([
            {"label": f"#{e['evaluation_id']} vs {e['opponent']['name']}", "value": e["result"]["win_rate"],
             "low": e["result"]["low"], "high": e["result"]["high"], "n": e["result"]["n"]} for e in found[:20]
        ], reference=0.5),
        flag_chart=interval_bars([
            {"label": FLAG_LABELS[name], "value": e.value, "low": e.low, "high": e.high, "n": e.n}
            for name, e in behaviour.flags.items()
        ]) if behaviour and behaviour.n_outputs else None,
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
def model_promote(version_id: int, request: Request, principal: AdminPage, db: SessionDep,
                  next_url: Annotated[str, Form(alias="next")] = "/admin/models"):
    """Promotes a ready version; the previously promoted one of its kind becomes ready."""
    version = get_version_or_404(db, version_id)
    if version.status != "promoted":
        with db.begin_nested():
            registry.promote(db, version)
    return RedirectResponse(_back(next_url, "/admin/models"), status_code=303)


@router.post("/admin/models/{version_id}/retire")
@renders_on_error(_model_again)
def model_retire(version_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Retires a ready version."""
    version = get_version_or_404(db, version_id)
    with db.begin_nested():
        registry.retire(db, version)
    return RedirectResponse(f"/admin/models/{version.id}", status_code=303)


# --- training runs -------------------------------------------------------------------------------


def _runs_page(request: Request, principal, db: Session, status_code: int = 200, **context: Any):
    found = db.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(RECENT_RUNS)).all()
    context.setdefault("form", {"kind": "sft", "params": ""})
    return render(
        request, "training/runs.html", principal, status_code=status_code, runs=found, schedule=schedule_preview(db),
        kinds=MANUAL_KINDS, params_help={kind: param_specs(kind) for kind in MANUAL_KINDS},
        fmt=fmt, **context,
    )


@router.get("/admin/runs")
def run_list(request: Request, principal: AdminPage, db: SessionDep):
    """Lists recent runs with live progress, the start-a-run form, and what the schedule would start next."""
    return _runs_page(request, principal, db)


def _runs_again(exc: AppError, request: Request, principal, db: Session, kind: str, params: str, **_):
    return _runs_page(request, principal, db, status_code=exc.status, error=str(exc),
                      form={"kind": kind, "params": params})


@router.post("/admin/runs")
@renders_on_error(_runs_again)
def run_start(request: Request, principal: AdminPage, db: SessionDep, kind: Annotated[str, Form()],
              params: Annotated[str, Form()] = ""):
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


def _run_page(request: Request, principal, db: Session, run: TrainingRun, status_code: int = 200, **context: Any):
    rows, other = flat_metrics(run.metrics or {})
    live = (run.metrics or {}).get("curve") or []
    latest = live[-1] if live and isinstance(live[-1], dict) else {}
    return render(
        request, "training/run.html", principal, status_code=status_code, run=run, charts=curves(run.metrics or {}),
        metric_rows=rows, metric_other=_pretty(other) if other else "", params=_pretty(run.params or {}),
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
