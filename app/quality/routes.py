"""Admin views of ranking quality: a batch's agreement, its gold tasks (API and pages), held-out labelers.

Before a batch's rankings train the reward model, admins check here how far
labelers agree (`app.quality.report`), which labelers to look at (too fast,
far below the batch's agreement, ranking by display order), and mark
labelers held out so the RM's accuracy on people it never learned from can
be measured. The API answers admins (session with X-CSRF-Token, or an
`admin`-scope token); the pages are for signed-in admins, with CSRF-protected
forms and SVG drawn on the server so the CSP stays strict.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session

from app.charts import interval_bars
from app.collection.api import get_batch_or_404
from app.deps import AdminApi, AdminPage, SessionDep
from app.errors import AppError, renders_on_error, validated
from app.models import PromptBatch
from app.quality import gold
from app.quality import report as quality
from app.quality.report import DailyAgreement
from app.templating import render
from app.vocabulary import MAX_ID

router = APIRouter()
api_router = APIRouter(prefix="/api/v1", tags=["quality"])
pages_router = APIRouter(include_in_schema=False)

Ties = Annotated[
    Literal["exclude", "disagree", "half"],
    Query(
        description="Pairs tied by a labeler: left out (default, as InstructGPT), counted as disagreement, "
        "or as half an agreement."
    ),
]

CHART_WIDTH, CHART_HEIGHT = 640, 160


def agreement_chart(days: list[DailyAgreement]) -> dict[str, Any]:
    """Places daily pairwise agreement on a 0..100 % SVG chart: a polyline and one dot per day."""
    points = [(d.day, d.pairwise) for d in days if d.pairwise is not None]
    if not points:
        return {}
    step = CHART_WIDTH / (len(points) - 1) if len(points) > 1 else 0
    dots = [
        {
            "x": round(i * step if step else CHART_WIDTH / 2, 1),
            "y": round(CHART_HEIGHT * (1 - value), 1),
            "label": f"{day.isoformat()}: {value * 100:.1f} %",
        }
        for i, (day, value) in enumerate(points)
    ]
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "dots": dots,
        "points": " ".join(f"{d['x']},{d['y']}" for d in dots),
        "first": points[0][0].isoformat(),
        "last": points[-1][0].isoformat(),
    }


@api_router.get("/batches/{batch_id}/agreement")
def batch_agreement_api(batch_id: int, db: SessionDep, principal: AdminApi, ties: Ties = "exclude") -> dict:
    """Agreement of a batch's overlapping rankings: pairwise, tau-b, ordinal alpha, per labeler, by day, warnings."""
    get_batch_or_404(db, batch_id)
    return quality.quality_report(db, batch_id, ties).as_dict()


@pages_router.get("/admin/batches/{batch_id}/quality")
def batch_quality_page(batch_id: int, request: Request, principal: AdminPage, db: SessionDep, ties: Ties = "exclude"):
    """Shows a batch's agreement, agreement over time, per-labeler table and warnings."""
    batch = get_batch_or_404(db, batch_id)
    report = quality.quality_report(db, batch_id, ties)
    return render(
        request, "quality/quality.html", principal, batch=batch, report=report, chart=agreement_chart(report.over_time)
    )


@pages_router.get("/admin/quality")
def quality_dashboard(request: Request, principal: AdminPage, db: SessionDep, ties: Ties = "exclude"):
    """Data quality at a glance, over every batch: agreement over time, each labeler's agreement and gold
    accuracy, warnings, and the win rates of the latest blind evaluations, as charts and tables."""
    from app.quality.evaluation_routes import recent_win_rates

    report = quality.quality_report(db, None, ties)
    _, on_gold = gold.gold_report(db, None)
    agreement_bars = interval_bars(
        [{"label": row.username, "value": row.agreement, "n": row.n_pairs} for row in report.labelers]
    )
    gold_bars = interval_bars(
        [
            {
                "label": row.username,
                "value": row.accuracy.value,
                "low": row.accuracy.low,
                "high": row.accuracy.high,
                "n": row.accuracy.n,
            }
            for row in on_gold
        ]
    )
    return render(
        request,
        "quality/quality_overview.html",
        principal,
        report=report,
        chart=agreement_chart(report.over_time),
        agreement_bars=agreement_bars,
        gold_rows=on_gold,
        gold_bars=gold_bars,
        win_bars=recent_win_rates(db),
    )


@pages_router.get("/admin/labelers")
def labelers_page(request: Request, principal: AdminPage, db: SessionDep):
    """Lists labelers with their held-out status and agreement over all batches."""
    return render(request, "quality/labelers.html", principal, labelers=quality.labelers_overview(db))


@pages_router.post("/admin/labelers/{labeler_id}/held-out")
def labeler_held_out(
    labeler_id: int,
    principal: AdminPage,
    db: SessionDep,
    held_out: Annotated[Literal["true", "false"] | None, Form()] = None,
):
    """Marks a labeler held out (rankings go to validation only) or back; toggles when `held_out` is absent."""
    user = quality.set_held_out(db, labeler_id, None if held_out is None else held_out == "true")
    if user is None:
        raise HTTPException(404, f"No labeler {labeler_id}")
    return RedirectResponse("/admin/labelers", status_code=303)


# --- gold tasks ----------------------------------------------------------------------------------


class GoldIn(BaseModel):
    """Which answer becomes gold: a submitted ranking (`ranking_id`), or a task's consensus (`task_id`)."""

    model_config = ConfigDict(extra="forbid")

    ranking_id: int | None = Field(None, ge=1, le=MAX_ID, description="A submitted ranking to use as the answer key")
    task_id: int | None = Field(None, ge=1, le=MAX_ID, description="A task whose rankings' consensus is the answer")

    @model_validator(mode="after")
    def _one_source(self) -> GoldIn:
        if (self.ranking_id is None) == (self.task_id is None):
            raise ValueError("give either ranking_id (a trusted ranking) or task_id (its consensus), not both")
        return self


def gold_summary(db: Session, batch: PromptBatch) -> dict[str, Any]:
    """A batch's gold tasks, labelers' accuracy on them and candidate tasks, as JSON-ready data."""
    tasks, labelers = gold.gold_report(db, batch.id)
    return {
        "batch_id": batch.id,
        "gold_share": batch.gold_share,
        "tasks": [vars(t) | {"answer": {str(k): v for k, v in t.answer.items()}} for t in tasks],
        "labelers": [row.as_dict() for row in labelers],
    }


@api_router.get("/batches/{batch_id}/gold")
def batch_gold_api(batch_id: int, db: SessionDep, principal: AdminApi) -> dict:
    """A batch's gold tasks with their answers, and each labeler's accuracy on gold with a 95 % interval."""
    return gold_summary(db, get_batch_or_404(db, batch_id))


def _mark(db: Session, batch_id: int, body: GoldIn, admin) -> int:
    with db.begin_nested():
        if body.ranking_id is not None:
            return gold.mark_ranking_gold(db, body.ranking_id, admin, batch_id).task_id
        if body.task_id is None:  # never: GoldIn's validator requires ranking_id or task_id
            raise gold.GoldError("task_id", "give either ranking_id or task_id")
        return gold.mark_consensus_gold(db, body.task_id, admin, batch_id).task_id


@api_router.post("/batches/{batch_id}/gold", status_code=201)
def batch_gold_mark(batch_id: int, body: GoldIn, db: SessionDep, principal: AdminApi) -> dict:
    """Makes a ranking, or a task's consensus, the known answer of its task; the task becomes a gold check."""
    get_batch_or_404(db, batch_id)
    task_id = _mark(db, batch_id, body, principal.user)
    return {"task_id": task_id, "is_gold": True}


@api_router.delete("/batches/{batch_id}/gold/{task_id}")
def batch_gold_unmark(batch_id: int, task_id: int, db: SessionDep, principal: AdminApi) -> dict:
    """Turns a gold task back into an ordinary one; the checks already answered stay recorded."""
    get_batch_or_404(db, batch_id)
    task = gold.unmark_gold(db, task_id, batch_id)
    return {"task_id": task.id, "is_gold": False}


def _gold_page(request: Request, principal, db: Session, batch, status_code: int = 200, **context: Any):
    tasks, labelers = gold.gold_report(db, batch.id)
    chart = interval_bars(
        [
            {
                "label": row.username,
                "value": row.accuracy.value,
                "low": row.accuracy.low,
                "high": row.accuracy.high,
                "n": row.accuracy.n,
            }
            for row in labelers
        ]
    )
    return render(
        request,
        "quality/gold.html",
        principal,
        status_code=status_code,
        batch=batch,
        tasks=tasks,
        labelers=labelers,
        chart=chart,
        candidates=gold.candidate_tasks(db, batch.id),
        min_consensus=gold.MIN_CONSENSUS_RANKINGS,
        **context,
    )


@pages_router.get("/admin/batches/{batch_id}/gold")
def batch_gold_page(batch_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Shows a batch's gold tasks, labelers' accuracy on them (chart and table) and tasks that could become gold."""
    return _gold_page(request, principal, db, get_batch_or_404(db, batch_id))


def _gold_again(exc: AppError, request: Request, principal, db: Session, batch_id: int, **_):
    return _gold_page(request, principal, db, get_batch_or_404(db, batch_id), status_code=exc.status, error=str(exc))


@pages_router.post("/admin/batches/{batch_id}/gold")
@renders_on_error(_gold_again)
def batch_gold_form(
    batch_id: int,
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    ranking_id: Annotated[str, Form()] = "",
    task_id: Annotated[str, Form()] = "",
):
    """Marks gold from the page: a ranking id, or a task whose consensus becomes the answer."""
    batch = get_batch_or_404(db, batch_id)
    body = validated(GoldIn, {k: v for k, v in (("ranking_id", ranking_id), ("task_id", task_id)) if v})
    _mark(db, batch.id, body, principal.user)
    return RedirectResponse(f"/admin/batches/{batch.id}/gold", status_code=303)


@pages_router.post("/admin/batches/{batch_id}/gold/{task_id}/remove")
@renders_on_error(_gold_again)
def batch_gold_remove(batch_id: int, task_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Turns a gold task back into an ordinary one."""
    batch = get_batch_or_404(db, batch_id)
    gold.unmark_gold(db, task_id, batch.id)
    return RedirectResponse(f"/admin/batches/{batch.id}/gold", status_code=303)


router.include_router(api_router)
router.include_router(pages_router)
