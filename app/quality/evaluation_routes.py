"""Blind human evaluations of model versions: the admin API and pages (`app.quality.evaluations`).

An admin picks two model versions and a number of held-out prompts; the
worker samples both, labelers judge the pairs blind, and these views show
A's win rate with its 95 % interval, the tie rate, and the breakdown per
prompt category and per world family. Callers are admins: a session (with
X-CSRF-Token on API writes) or a token with the `admin` scope.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import audit
from app.charts import interval_bars
from app.deps import AdminApi, AdminPage, Principal, SessionDep
from app.errors import AppError, renders_on_error, validated
from app.models import Evaluation, ModelVersion, PromptBatch
from app.quality import evaluations
from app.templating import render
from app.vocabulary import MAX_ID

router = APIRouter()
api_router = APIRouter(prefix="/api/v1", tags=["evaluations"])
pages_router = APIRouter(include_in_schema=False)

EvaluationStatus = Literal["sampling", "labeling", "completed", "cancelled"]


class EvaluationIn(BaseModel):
    """A blind comparison to start: A is the candidate, B the baseline; win rates are A's."""

    model_config = ConfigDict(extra="forbid")

    model_a_id: int = Field(ge=1, le=MAX_ID, description="The candidate (a base, SFT or policy version)")
    model_b_id: int = Field(ge=1, le=MAX_ID, description="The baseline, e.g. the promoted policy")
    n_prompts: int = Field(50, ge=1, le=evaluations.MAX_PROMPTS, description="Held-out prompts to compare on")
    overlap: int = Field(1, ge=1, le=20, description="Labelers per prompt")
    prompt_split: Literal["test", "valid"] = Field("test", description="Which held-out split the prompts come from")
    temperature: float = Field(0.0, ge=0, le=10, description="Sampling temperature; 0 is greedy")
    max_new_tokens: int = Field(48, ge=1, le=4096)
    source_batch_id: int | None = Field(None, ge=1, le=MAX_ID, description="Only prompts of this batch")


class TallyOut(BaseModel):
    wins: int = Field(description="Verdicts for A")
    losses: int = Field(description="Verdicts for B")
    ties: int
    n: int
    win_rate: float | None = Field(description="A's win rate, ties counting half")
    low: float | None = Field(description="95 % Wilson interval, lower bound")
    high: float | None = Field(description="95 % Wilson interval, upper bound")
    tie_rate: float | None


class ModelRef(BaseModel):
    id: int
    name: str | None
    kind: str | None


class EvaluationOut(BaseModel):
    id: int
    status: str
    batch_id: int
    model_a: ModelRef
    model_b: ModelRef
    n_prompts: int
    overlap: int
    prompt_split: str
    temperature: float
    max_new_tokens: int
    triggered_by: str
    created_at: datetime
    completed_at: datetime | None
    n_identical: int = Field(description="Prompts where both models wrote the same text (not judged)")
    tasks: int
    tasks_done: int = Field(description="Verdicts given so far")
    labelers: int
    overall: TallyOut
    by_category: dict[str, TallyOut]
    by_family: dict[str, TallyOut] = Field(description="Per family of the bundled world, when prompts have one")
    first_shown_wins: float | None = Field(
        description="Share of decisive verdicts won by the output shown first (0.5 = no position bias)"
    )


def evaluation_out(db: Session, evaluation: Evaluation) -> EvaluationOut:
    """Serialises an evaluation with its current results."""
    result = evaluations.results(db, evaluation)
    return EvaluationOut(
        id=evaluation.id,
        status=evaluation.status,
        batch_id=evaluation.batch_id,
        model_a=result.model_a,
        model_b=result.model_b,
        n_prompts=evaluation.n_prompts,
        overlap=evaluation.overlap,
        prompt_split=evaluation.prompt_split,
        temperature=evaluation.temperature,
        max_new_tokens=evaluation.max_new_tokens,
        triggered_by=evaluation.triggered_by,
        created_at=evaluation.created_at,
        completed_at=evaluation.completed_at,
        n_identical=evaluation.n_identical,
        tasks=result.tasks,
        tasks_done=result.tasks_done,
        labelers=result.labelers,
        overall=result.overall,
        by_category=result.by_category,
        by_family=result.by_family,
        first_shown_wins=result.first_shown_wins,
    )


def get_evaluation_or_404(db: Session, evaluation_id: int) -> Evaluation:
    evaluation = db.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise HTTPException(404, f"evaluation {evaluation_id} not found")
    return evaluation


def _cancel(db: Session, evaluation_id: int, principal: Principal, request: Request) -> Evaluation:
    """Cancels an evaluation for the API and the page alike: 404 when unknown, 409 once it has ended."""
    evaluation = evaluations.cancel_evaluation(db, get_evaluation_or_404(db, evaluation_id))
    audit.record(db, principal.user, "evaluation.cancelled", f"evaluation {evaluation.id}", request)
    return evaluation


def _start(db: Session, body: EvaluationIn, principal: Principal, request: Request) -> Evaluation:
    with db.begin_nested():
        evaluation = evaluations.start_evaluation(db, **body.model_dump(), created_by_id=principal.user.id)
        audit.record(
            db,
            principal.user,
            "evaluation.started",
            f"evaluation {evaluation.id}",
            request,
            model_a_id=body.model_a_id,
            model_b_id=body.model_b_id,
        )
        return evaluation


# --- API -----------------------------------------------------------------------------------------


@api_router.get("/evaluations", response_model=list[EvaluationOut])
def list_evaluations(
    db: SessionDep,
    principal: AdminApi,
    status: Annotated[EvaluationStatus | None, Query()] = None,
    model_version_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only evaluations this version took part in")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
):
    """Lists evaluations, newest first, with their results so far."""
    query = select(Evaluation).order_by(Evaluation.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Evaluation.status == status)
    if model_version_id is not None:
        query = query.where((Evaluation.model_a_id == model_version_id) | (Evaluation.model_b_id == model_version_id))
    return [evaluation_out(db, e) for e in db.scalars(query)]


@api_router.post("/evaluations", status_code=201, response_model=EvaluationOut)
def create_evaluation(body: EvaluationIn, request: Request, db: SessionDep, principal: AdminApi):
    """Starts a blind comparison of two versions on held-out prompts; the worker samples both, labelers judge."""
    return evaluation_out(db, _start(db, body, principal, request))


@api_router.get("/evaluations/{evaluation_id}", response_model=EvaluationOut)
def get_evaluation(evaluation_id: int, db: SessionDep, principal: AdminApi):
    """Shows an evaluation: progress, A's win rate with its interval, tie rate, per category and family."""
    return evaluation_out(db, get_evaluation_or_404(db, evaluation_id))


@api_router.post("/evaluations/{evaluation_id}/cancel", response_model=EvaluationOut)
def cancel_evaluation(evaluation_id: int, request: Request, db: SessionDep, principal: AdminApi):
    """Cancels an evaluation that has not completed (its tasks leave the queues); 409 otherwise."""
    return evaluation_out(db, _cancel(db, evaluation_id, principal, request))


# --- pages ---------------------------------------------------------------------------------------


def _generators(db: Session) -> list[ModelVersion]:
    return list(
        db.scalars(
            select(ModelVersion)
            .where(ModelVersion.kind.in_(evaluations.GENERATIVE_KINDS), ModelVersion.status.in_(("ready", "promoted")))
            .order_by(ModelVersion.id.desc())
        )
    )


def _win_bars(rows: list[EvaluationOut]) -> dict[str, Any] | None:
    return interval_bars(
        [
            {
                "label": f"#{r.id} {r.model_a.name} vs {r.model_b.name}",
                "value": r.overall.win_rate,
                "low": r.overall.low,
                "high": r.overall.high,
                "n": r.overall.n,
            }
            for r in rows
        ],
        reference=0.5,
    )


def recent_win_rates(db: Session, limit: int = 20) -> dict[str, Any] | None:
    """The win-rate chart of the latest evaluations (also drawn on the quality dashboard)."""
    return _win_bars(
        [evaluation_out(db, e) for e in db.scalars(select(Evaluation).order_by(Evaluation.id.desc()).limit(limit))]
    )


def _list_page(request: Request, principal, db: Session, status_code: int = 200, **context: Any):
    found = db.scalars(select(Evaluation).order_by(Evaluation.id.desc()).limit(200)).all()
    rows = [evaluation_out(db, e) for e in found]
    chart = _win_bars(rows[:20])
    batches = db.scalars(
        select(PromptBatch).where(PromptBatch.purpose == "collection").order_by(PromptBatch.id.desc()).limit(200)
    ).all()
    context.setdefault("form", {})
    return render(
        request,
        "quality/evaluations.html",
        principal,
        status_code=status_code,
        rows=rows,
        chart=chart,
        models=_generators(db),
        batches=batches,
        **context,
    )


@pages_router.get("/admin/evaluations")
def evaluations_page(request: Request, principal: AdminPage, db: SessionDep):
    """Lists evaluations with their win rates (a chart and a table) and the form that starts one."""
    return _list_page(request, principal, db)


async def _start_form(request: Request) -> dict[str, str]:
    return {k: v for k, v in (await request.form()).items() if isinstance(v, str) and k != "csrf_token"}


def _start_again(exc: AppError, request: Request, principal, db: Session, form: dict[str, str], **_):
    return _list_page(request, principal, db, status_code=exc.status, form=form, error=str(exc))


@pages_router.post("/admin/evaluations")
@renders_on_error(_start_again)
def evaluations_start(
    request: Request, principal: AdminPage, db: SessionDep, form: Annotated[dict[str, str], Depends(_start_form)]
):
    """Starts an evaluation from the form; shows the form again with the error when it is refused."""
    body = validated(EvaluationIn, {k: v for k, v in form.items() if v != ""})
    evaluation = _start(db, body, principal, request)
    return RedirectResponse(f"/admin/evaluations/{evaluation.id}", status_code=303)


@pages_router.get("/admin/evaluations/{evaluation_id}")
def evaluation_page(evaluation_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Shows one evaluation: progress, A's win rate with its interval, and the breakdowns as a chart and tables."""
    evaluation = get_evaluation_or_404(db, evaluation_id)
    out = evaluation_out(db, evaluation)
    slices = (
        [("All prompts", out.overall)]
        + [(f"category: {k}", v) for k, v in out.by_category.items()]
        + [(f"family: {k}", v) for k, v in out.by_family.items()]
    )
    chart = interval_bars(
        [{"label": label, "value": t.win_rate, "low": t.low, "high": t.high, "n": t.n} for label, t in slices],
        reference=0.5,
    )
    return render(request, "quality/evaluation.html", principal, evaluation=evaluation, out=out, chart=chart)


@pages_router.post("/admin/evaluations/{evaluation_id}/cancel")
def evaluation_cancel(evaluation_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Cancels an evaluation that has not completed."""
    return RedirectResponse(f"/admin/evaluations/{_cancel(db, evaluation_id, principal, request).id}", status_code=303)


router.include_router(api_router)
router.include_router(pages_router)
