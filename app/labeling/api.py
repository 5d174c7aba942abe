"""The labeler JSON API: the same lease → draft → submit/skip flow as the pages, for scripts and other front ends.

Callers use a labeler session (with the X-CSRF-Token header on writes) or a
token with the `label` scope. Errors name the field: `items[2].likert: ...`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from app.conversations import messages_of
from app.deps import LabelerApi, SessionDep
from app.labeling import blind, leases, submissions
from app.models import Demonstration, EvalJudgment
from app.vocabulary import RANKING_FLAGS as _FLAGS

router = APIRouter(prefix="/api/v1", tags=["labeling"])


class CompletionOut(BaseModel):
    id: int = Field(description="The output's id for this assignment only: opaque, and new for every assignment")
    text: str


class AssignmentOut(BaseModel):
    """A leased task as its labeler sees it: no task, prompt or completion id that could single out a check."""

    assignment_id: int
    kind: str
    batch_id: int
    prompt: str = Field(description="The prompt's text: the last user message of `messages`")
    messages: list[dict[str, str]] = Field(
        description="The prompt as a conversation, [{role, content}, ...] ending with the user message answered"
    )
    guidelines: str
    completions: list[CompletionOut] = Field(description="In this labeler's display order")
    draft: dict[str, Any]
    lease_expires_at: datetime
    state: str
    flags: list[str] = Field(default_factory=lambda: list(_FLAGS))
    skip_reasons: dict[str, str] = Field(default_factory=lambda: dict(leases.SKIP_REASONS))


class RankingItemIn(BaseModel):
    completion_id: int = Field(description="The output's id as this assignment shows it")
    rank: int = Field(description="Slot, 1 = best; outputs in the same slot are tied")
    likert: int = Field(description="1 (worst) to 7 (best)")
    flags: list[str] = Field(default_factory=list)


class SubmitIn(BaseModel):
    text: str | None = Field(None, description="The demonstration (for demonstration tasks)")
    items: list[RankingItemIn] | None = Field(None, description="Ranks and scores (for ranking tasks)")
    all_unacceptable: bool = False
    choice: int | Literal["tie"] | None = Field(
        None,
        description='The id of the better output as shown, or "tie" (for eval tasks: blind side-by-side comparisons)',
    )
    active_seconds: float = Field(0.0, ge=0, le=86400)


class SubmitOut(BaseModel):
    assignment_id: int
    kind: Literal["demonstration", "ranking", "eval"]
    id: int
    created_at: datetime
    items: list[dict[str, Any]] | None = None
    choice: int | Literal["tie"] | None = None


class SkipIn(BaseModel):
    reason: str
    note: str = Field("", max_length=2000)


class DraftIn(BaseModel):
    draft: dict[str, Any]
    active_seconds: float | None = Field(None, ge=0, le=86400)


def _json(model: BaseModel) -> Response:
    """Answers with a model this module just built and validated.

    The lease and submit routes are the labeling hot path, and every trip between the event loop and a
    worker thread costs about as much CPU as a small query. Returning the model itself would make FastAPI
    validate it again against `response_model` in one more trip (for a sync route), and leaving the commit
    to `SessionDep` would take another after the route returns; so these routes answer with this response
    (`response_model` still documents it) and commit themselves, in the worker thread they run in.
    """
    return Response(model.model_dump_json(), media_type="application/json")


def assignment_out(db, assignment, view: leases.TaskView | None = None) -> AssignmentOut:
    """Serialises an assignment with everything needed to label it."""
    view = view or leases.task_view(db, assignment)
    return AssignmentOut(
        assignment_id=assignment.id,
        kind=view.task.kind,
        batch_id=view.batch.id,
        prompt=view.prompt.text,
        messages=messages_of(view.prompt.messages, view.prompt.text),
        guidelines=view.batch.guidelines,
        completions=[CompletionOut(id=blind.output_id(assignment.id, c.id), text=c.text) for c in view.completions],
        draft=assignment.draft or {},
        lease_expires_at=assignment.expires_at,
        state=assignment.state,
    )


@router.get("/tasks/next", response_model=AssignmentOut, responses={204: {"description": "Nothing left to label"}})
def next_task(
    db: SessionDep,
    principal: LabelerApi,
    kind: Annotated[Literal["ranking", "demonstration", "eval"] | None, Query()] = None,
):
    """Leases the next task (or returns the one already held); 204 when nothing is left."""
    view = leases.lease_next_view(db, principal.user, kind)
    if view is None:
        return Response(status_code=204)
    answer = _json(assignment_out(db, view.assignment, view))
    db.commit()  # here rather than by SessionDep after the return: see `_json`
    return answer


@router.get("/assignments/{assignment_id}", response_model=AssignmentOut)
def get_assignment(assignment_id: int, db: SessionDep, principal: LabelerApi):
    """Shows one of the caller's assignments."""
    return assignment_out(db, leases.get_assignment(db, assignment_id, principal.user))


@router.post("/assignments/{assignment_id}/submit", response_model=SubmitOut)
def submit(assignment_id: int, body: SubmitIn, db: SessionDep, principal: LabelerApi):
    """Submits a demonstration, a ranking or an eval verdict; repeating it returns the stored result."""
    label = submissions.submit(
        db,
        principal.user,
        assignment_id,
        text=body.text,
        items=None if body.items is None else [i.model_dump() for i in body.items],
        all_unacceptable=body.all_unacceptable,
        choice=body.choice,
        active_seconds=body.active_seconds,
        shown=True,  # outputs go by the ids this assignment shows (app.labeling.blind)
    )
    if isinstance(label, EvalJudgment):
        # Blind: the answer echoes the output chosen, never which model wrote it.
        answer = SubmitOut(
            assignment_id=assignment_id,
            kind="eval",
            id=label.id,
            created_at=label.created_at,
            choice=blind.output_id(assignment_id, label.chosen_completion_id) if label.chosen_completion_id else "tie",
        )
    elif isinstance(label, Demonstration):
        answer = SubmitOut(assignment_id=assignment_id, kind="demonstration", id=label.id, created_at=label.created_at)
    else:
        answer = SubmitOut(
            assignment_id=assignment_id,
            kind="ranking",
            id=label.id,
            created_at=label.created_at,
            items=[
                {
                    "completion_id": blind.output_id(assignment_id, i.completion_id),
                    "rank": i.rank,
                    "likert": i.likert,
                    "flags": i.flags,
                }
                for i in label.items
            ],
        )
    response = _json(answer)
    # Committed here rather than by SessionDep after the return (see `_json`); for a submit that closed a task
    # this also releases its batch's row lock, which every other submit closing a task there waits for.
    db.commit()
    return response


@router.post("/assignments/{assignment_id}/skip")
def skip(assignment_id: int, body: SkipIn, db: SessionDep, principal: LabelerApi) -> dict:
    """Skips a task with a reason; it is not offered to the caller again."""
    assignment = submissions.skip(db, principal.user, assignment_id, body.reason, body.note)
    return {"assignment_id": assignment.id, "state": assignment.state}


@router.put("/assignments/{assignment_id}/draft")
def save_draft(assignment_id: int, body: DraftIn, db: SessionDep, principal: LabelerApi) -> dict:
    """Autosaves a draft and renews the lease."""
    assignment = submissions.save_draft(db, principal.user, assignment_id, body.draft, body.active_seconds)
    return {"assignment_id": assignment.id, "lease_expires_at": assignment.expires_at.isoformat()}
