"""Prompt writing for labelers: the /label/write page and POST /api/v1/prompts/written.

Both go through `app.collection.prompt_writing`, so a written prompt meets the
batch's hygiene rules whichever way it arrives. The page is a plain CSRF
form (no script needed): one tab per kind of prompt, the few-shot form grows
a row at a time with its own button, and after a submit the page shows
what hygiene decided ("dropped: duplicate of an existing prompt") with the
text as stored. Problems a labeler can fix come back as a 422 naming the
field, with everything they typed still in the form.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from app.collection import prompt_writing as writing
from app.deps import LabelerApi, LabelerPage, SessionDep
from app.errors import AppError, renders_on_error
from app.templating import render, render_guidelines
from app.vocabulary import MAX_ID

router = APIRouter()

CATEGORY_LABELS = {
    "plain": "Plain",
    "few-shot": "Few-shot",
    "user-based": "User-based",
}
CATEGORY_HINTS = {
    "plain": "Any task you would give an assistant, written exactly as the model should see it.",
    "few-shot": "An instruction and several query/response examples of it; add a last query for the model "
    "to answer, or leave it empty.",
    "user-based": 'A use case someone could have for the model (e.g. "summarise support tickets") and a '
    "prompt they would write for it.",
}
DEFAULT_EXAMPLE_ROWS = 3


# --- the page -----------------------------------------------------------------------------------


async def _write_form(request: Request) -> dict[str, Any]:
    # Read here, in the event loop, like the CSRF check (the form is parsed once per request).
    form = await request.form()
    values: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}
    values["example_query"] = [v for v in form.getlist("example_query") if isinstance(v, str)]
    values["example_response"] = [v for v in form.getlist("example_response") if isinstance(v, str)]
    return values


WriteForm = Annotated[dict[str, Any], Depends(_write_form)]


def _draft_from_form(form: dict[str, Any]) -> writing.PromptDraft:
    queries, responses = form.get("example_query", []), form.get("example_response", [])
    rows = max(len(queries), len(responses))
    examples = [
        writing.FewShotExample(
            query=queries[i] if i < len(queries) else "", response=responses[i] if i < len(responses) else ""
        )
        for i in range(rows)
    ]
    return writing.PromptDraft(
        category=form.get("category", "plain"),
        text=form.get("text", ""),
        instruction=form.get("instruction", ""),
        examples=examples,
        final_query=form.get("final_query", ""),
        use_case=form.get("use_case", ""),
    )


def _page(
    request: Request,
    db,
    principal,
    *,
    form: dict[str, Any],
    status_code: int = 200,
    error: AppError | None = None,
    outcome: writing.WritingOutcome | None = None,
):
    batches = writing.writable_batches(db)
    category: str = form["category"] if form.get("category") in CATEGORY_LABELS else "plain"
    chosen = str(form.get("batch_id") or (batches[0].id if batches else ""))
    selected = next((b for b in batches if str(b.id) == chosen), None)
    queries, responses = list(form.get("example_query", [])), list(form.get("example_response", []))
    rows = min(writing.MAX_EXAMPLES, max(DEFAULT_EXAMPLE_ROWS, len(queries), len(responses), _int(form.get("rows"))))
    examples = [
        (queries[i] if i < len(queries) else "", responses[i] if i < len(responses) else "") for i in range(rows)
    ]
    return render(
        request,
        "collection/write.html",
        principal,
        status_code=status_code,
        batches=batches,
        selected=selected,
        chosen=chosen,
        category=category,
        categories=CATEGORY_LABELS,
        hint=CATEGORY_HINTS[category],
        form=form,
        examples=examples,
        max_examples=writing.MAX_EXAMPLES,
        min_examples=writing.MIN_EXAMPLES,
        error=error,
        error_field=(error.field or "") if error else "",
        outcome=outcome,
        guidelines_html=render_guidelines(selected.guidelines) if selected else "",
    )


@router.get("/label/write", include_in_schema=False)
def write_page(
    request: Request,
    db: SessionDep,
    principal: LabelerPage,
    category: Annotated[Literal["plain", "few-shot", "user-based"], Query()] = "plain",
    batch_id: Annotated[int | None, Query()] = None,
):
    """Shows the prompt-writing form for the batches that accept written prompts."""
    return _page(request, db, principal, form={"category": category, "batch_id": batch_id or ""})


def _write_again(exc: AppError, request: Request, db, principal, form: dict[str, Any], **_):
    return _page(request, db, principal, form=form, status_code=exc.status, error=exc)


@router.post("/label/write", include_in_schema=False)
@renders_on_error(_write_again)
def write_submit(request: Request, db: SessionDep, principal: LabelerPage, form: WriteForm):
    """Checks a written prompt against the batch's hygiene rules and stores it when it passes."""
    if form.get("action") == "add_example":
        # One more example row; nothing is submitted.
        form["rows"] = len(form.get("example_query", [])) + 1
        return _page(request, db, principal, form=form)
    batch_id = _batch_id(form.get("batch_id"))
    outcome = writing.write_prompt(db, principal.user, batch_id, _draft_from_form(form))
    if outcome.kept:
        # Stored: a fresh form for the next prompt, same batch and kind.
        form = {"category": form.get("category"), "batch_id": form.get("batch_id")}
    return _page(request, db, principal, form=form, outcome=outcome)


def _int(raw: Any) -> int:
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return 0


def _batch_id(raw: Any) -> int:
    try:
        value = int(raw)
        if not 1 <= value <= MAX_ID:
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise writing.PromptWritingError("batch_id", "choose a batch") from None


# --- the API ------------------------------------------------------------------------------------


class ExampleIn(BaseModel):
    query: str = Field(max_length=100_000)
    response: str = Field(max_length=100_000)


class WrittenPromptIn(BaseModel):
    batch_id: int = Field(ge=1, le=MAX_ID)
    category: Literal["plain", "few-shot", "user-based"] = "plain"
    text: str = Field("", max_length=100_000, description="The prompt (plain and user-based)")
    instruction: str = Field("", max_length=100_000, description="The instruction (few-shot)")
    examples: list[ExampleIn] = Field(
        default_factory=list, max_length=50, description="Query/response pairs (few-shot)"
    )
    final_query: str = Field("", max_length=100_000, description="A last query for the model to answer (few-shot)")
    use_case: str = Field("", max_length=100_000, description="The use case the prompt is for (user-based)")


class WrittenPromptOut(BaseModel):
    kept: bool = Field(description="Whether the prompt passed hygiene and was stored")
    message: str = Field(description="The hygiene outcome, e.g. 'dropped: duplicate of an existing prompt'")
    rule: str | None = Field(None, description="The hygiene rule that dropped it")
    prompt_id: int | None = None
    batch_id: int
    category: str
    text: str = Field(description="The prompt text as assembled (and redacted, under the redact policy)")
    pii_flags: list[str] = Field(default_factory=list)
    next_step: str = Field("", description="How the prompt reaches labeling")
    sample_run_id: int | None = None


class WritableBatchOut(BaseModel):
    id: int
    name: str
    status: str
    guidelines: str
    wants_demonstrations: bool
    wants_rankings: bool
    k: int
    pii_policy: str


@router.get("/api/v1/prompts/writable-batches", response_model=list[WritableBatchOut], tags=["prompt writing"])
def writable_batches(db: SessionDep, principal: LabelerApi):
    """Lists the batches that accept written prompts."""
    return [WritableBatchOut.model_validate(b, from_attributes=True) for b in writing.writable_batches(db)]


@router.post(
    "/api/v1/prompts/written",
    response_model=WrittenPromptOut,
    tags=["prompt writing"],
    responses={201: {"description": "Stored"}, 200: {"description": "Dropped by a hygiene rule"}},
)
def write_prompt(body: WrittenPromptIn, response: Response, db: SessionDep, principal: LabelerApi):
    """Writes a prompt into a batch; 201 when hygiene keeps it, 200 with the reason when it drops it."""
    draft = writing.PromptDraft(
        category=body.category,
        text=body.text,
        instruction=body.instruction,
        final_query=body.final_query,
        use_case=body.use_case,
        examples=[writing.FewShotExample(e.query, e.response) for e in body.examples],
    )
    outcome = writing.write_prompt(db, principal.user, body.batch_id, draft)
    response.status_code = 201 if outcome.kept else 200
    return WrittenPromptOut(
        kept=outcome.kept,
        message=outcome.message,
        rule=outcome.rule,
        prompt_id=outcome.prompt.id if outcome.prompt else None,
        batch_id=outcome.batch.id,
        category=outcome.category,
        text=outcome.text,
        pii_flags=outcome.pii_flags,
        next_step=outcome.next_step,
        sample_run_id=outcome.sample_run_id,
    )
