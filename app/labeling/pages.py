"""The labeler's browser pages: take the next task, then write a demonstration or rank K outputs.

`/label/next` leases a task and redirects to its page; the pages render the
prompt, the outputs and the batch guidelines server-side (escaped: they are
untrusted text) and their scripts drive the JSON API in
`app.labeling.api` for autosave, submit and skip, so the browser and
any script go through the same service calls.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import LabelerPage, SessionDep
from app.labeling import blind, leases, submissions
from app.models import Assignment, Task, User
from app.templating import render, render_guidelines
from app.vocabulary import RANKING_FLAGS

router = APIRouter(include_in_schema=False)

FLAG_LABELS = {
    "fails_instruction": "Fails to follow the instruction",
    "hallucination": "Hallucination (makes things up)",
    "inappropriate_for_assistant": "Inappropriate for a customer assistant",
    "sexual_content": "Contains sexual content",
    "violent_content": "Contains violent content",
    "encourages_violence": "Encourages violence or self-harm",
    "denigrates_protected_class": "Denigrates a protected class",
    "harmful_advice": "Gives harmful advice",
    "moral_judgment": "Expresses moral judgment",
    "personal_data": "Contains personal data",
}
LIKERT_LABELS = {1: "very bad", 4: "neutral", 7: "very good"}
KIND_NAMES = {"ranking": "Ranking", "demonstration": "Demonstration", "eval": "Comparison"}


def just_submitted(db: Session, user: User, assignment_id: int | None) -> dict[str, Any] | None:
    """Gets the confirmation shown on the page after a submit: which of the user's assignments, of what kind."""
    if assignment_id is None:
        return None
    kind = db.scalar(
        select(Task.kind)
        .join(Assignment, Assignment.task_id == Task.id)
        .where(Assignment.id == assignment_id, Assignment.labeler_id == user.id, Assignment.state == "submitted")
    )
    return {"id": assignment_id, "what": KIND_NAMES.get(kind, "Label")} if kind else None


@router.get("/label/next")
def next_task(
    request: Request,
    db: SessionDep,
    principal: LabelerPage,
    kind: Annotated[Literal["ranking", "demonstration", "eval"] | None, Query()] = None,
    submitted: Annotated[int | None, Query()] = None,
):
    """Leases the next task (or the one already held) and opens it; a calm 'all done' page when none is left.

    `submitted`: the assignment just submitted, confirmed on the page that opens."""
    assignment = None
    for wanted in [kind] if kind else ["eval", "ranking", "demonstration"]:
        assignment = assignment or leases.lease_next_task(db, principal.user, wanted)
    if assignment is None:
        confirmation = just_submitted(db, principal.user, submitted)
        return render(request, "labeling/done.html", principal, kind=kind, just_submitted=confirmation)
    query = f"?submitted={submitted}" if submitted is not None else ""
    return RedirectResponse(f"/label/assignments/{assignment.id}{query}", status_code=303)


@router.get("/label/assignments/{assignment_id}")
def assignment_page(
    assignment_id: int,
    request: Request,
    db: SessionDep,
    principal: LabelerPage,
    submitted: Annotated[int | None, Query()] = None,
):
    """Shows one of the labeler's assignments on its task page, or read-only once submitted or skipped."""
    assignment = leases.get_assignment(db, assignment_id, principal.user)
    view = leases.task_view(db, assignment)
    kind = view.task.kind
    letters = [chr(ord("A") + i) for i in range(len(view.completions))]
    if assignment.state in ("submitted", "skipped"):
        # Done already (the back button, a second tab): show what was sent, never another task in its place,
        # where text typed "to fix a typo" would become the answer to a different prompt.
        response = render(
            request,
            "labeling/submitted.html",
            principal,
            view=view,
            kind=kind,
            kind_name=KIND_NAMES.get(kind, "Label"),
            work=submissions.submitted_work(db, assignment),
            letters=letters,
            skip_reason=leases.SKIP_REASONS.get(assignment.skip_reason or "", assignment.skip_reason),
            next_url=f"/label/next?kind={kind}",
        )
        response.headers["cache-control"] = "no-store"
        return response
    # Outputs go by ids new for every assignment (app.labeling.blind): completion ids would tell which model
    # was sampled first in a blind comparison, and which task is a gold check.
    shown_ids = blind.shown_ids(assignment.id, [c.id for c in view.completions])
    context: dict[str, Any] = {
        "view": view,
        "shown_ids": shown_ids,
        "guidelines_html": render_guidelines(view.batch.guidelines),
        "skip_reasons": leases.SKIP_REASONS,
        "page_data": {
            "assignment_id": assignment.id,
            "kind": kind,
            "draft": assignment.draft or {},
            "active_seconds": assignment.active_seconds or 0.0,
            "completion_ids": shown_ids,
            "next_url": f"/label/next?kind={kind}",
            "submitted_url": f"/label/next?kind={kind}&submitted={assignment.id}",
            "max_chars": leases.MAX_DEMONSTRATION_CHARS,
        },
        "just_submitted": just_submitted(db, principal.user, submitted),
    }
    if kind == "ranking":
        context.update(
            flags=[(flag, FLAG_LABELS.get(flag, flag.replace("_", " "))) for flag in RANKING_FLAGS],
            likert_labels=LIKERT_LABELS,
            letters=letters,
        )
    response = render(request, f"labeling/{kind}.html", principal, **context)
    # The draft on the server is the truth: a reload or the back button must not show a cached page.
    response.headers["cache-control"] = "no-store"
    return response
