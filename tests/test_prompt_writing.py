"""Prompt writing: the few-shot format, field-named errors, the batch's hygiene rules on written prompts,
how a written prompt joins a draft or a running batch, the /label/write page and the JSON API."""

from __future__ import annotations

import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from app.collection import prompt_writing as writing
from app.collection.hygiene import normalized_key, prefix_key
from app.collection.sampling import open_for_labeling, prompts_needing_samples, store_samples
from app.labeling import leases
from app.models import Prompt, PromptBatch, Task, TrainingRun
from app.security import create_api_token
from tests.factories import AdminFactory, ModelVersionFactory, UserFactory

pytestmark = pytest.mark.sqlite

Draft, Example = writing.PromptDraft, writing.FewShotExample


def make_batch(
    db,
    *,
    status: str = "draft",
    allow: bool = True,
    pii_policy: str = "drop",
    demonstrations: bool = True,
    rankings: bool = True,
    hygiene_config: dict | None = None,
    guidelines: str = "Write prompts about **arithmetic**.",
) -> PromptBatch:
    """A batch that accepts written prompts (unless allow=False), with the hygiene config of a past import."""
    batch = PromptBatch(
        name=f"write-{uuid.uuid4().hex[:8]}",
        status=status,
        allow_prompt_writing=allow,
        k=4,
        pii_policy=pii_policy,
        wants_demonstrations=demonstrations,
        wants_rankings=rankings,
        guidelines=guidelines,
        hygiene_report={"config": hygiene_config} if hygiene_config else {},
    )
    db.add(batch)
    db.flush()
    return batch


def store_prompt(db, batch: PromptBatch, text: str, prefix_chars: int = 100) -> Prompt:
    """Stores a prompt with the keys an import with this prefix length gives it."""
    prompt = Prompt(
        batch_id=batch.id, text=text, normalized_key=normalized_key(text), prefix_key=prefix_key(text, prefix_chars)
    )
    db.add(prompt)
    db.flush()
    return prompt


def count(db, model, *where) -> int:
    return db.scalar(select(func.count()).select_from(model).where(*where))


# --- composing ----------------------------------------------------------------------------------


def test_few_shot_parts_are_assembled_in_the_documented_format():
    examples = [Example("2 + 2", "4"), Example("\n  10 - 3\n", "7  \n")]
    assert writing.assemble_few_shot("Answer the sum.\n", examples, "5 + 1") == (
        "Answer the sum.\n\nQuery: 2 + 2\nResponse: 4\n\nQuery:   10 - 3\nResponse: 7\n\nQuery: 5 + 1\nResponse:"
    )
    assert writing.assemble_few_shot("Add.", examples[:1]) == "Add.\n\nQuery: 2 + 2\nResponse: 4"


@pytest.mark.parametrize(
    ("draft", "field"),
    [
        (Draft(category="plain", text="  \n "), "text"),
        (Draft(category="poem", text="hi"), "category"),
        (Draft(category="user-based", text="Summarise this ticket."), "use_case"),
        (Draft(category="user-based", use_case="support desk"), "text"),
        (Draft(category="few-shot", examples=[Example("a", "b"), Example("c", "d")]), "instruction"),
        (Draft(category="few-shot", instruction="Do it.", examples=[Example("a", "b")]), "examples"),
        # The empty first row is ignored, but the half-filled second one is named as the labeler sees it.
        (
            Draft(
                category="few-shot",
                instruction="Do it.",
                examples=[Example("", ""), Example("q", " "), Example("a", "b")],
            ),
            "examples[1].response",
        ),
        (
            Draft(category="few-shot", instruction="Do it.", examples=[Example("", "b"), Example("a", "b")]),
            "examples[0].query",
        ),
        (Draft(category="plain", text="nul \x00 here"), "text"),
    ],
)
def test_bad_drafts_are_refused_naming_the_field(draft, field):
    with pytest.raises(writing.PromptWritingError) as caught:
        writing.compose(draft)
    assert caught.value.field == field and caught.value.status == 422
    assert str(caught.value).startswith(f"{field}: ")


def test_user_based_prompts_keep_the_use_case_beside_the_text():
    text, metadata = writing.compose(
        Draft(
            category="user-based",
            use_case="A teacher making quizzes",
            text="Turn these notes into 3 questions:\n- photosynthesis",
        )
    )
    assert text == "Turn these notes into 3 questions:\n- photosynthesis"
    assert metadata == {"written": True, "use_case": "A teacher making quizzes"}


# --- storing with the batch's hygiene rules -----------------------------------------------------


def test_a_written_prompt_joins_a_draft_batch_with_author_and_category(db):
    batch = make_batch(db)
    author = UserFactory()
    draft = Draft(
        category="few-shot",
        instruction="Reverse the word.",
        examples=[Example("cat", "tac"), Example("dog", "god")],
        final_query="bird",
    )
    outcome = writing.write_prompt(db, author, batch.id, draft)
    assert outcome.kept and outcome.message == "kept" and outcome.rule is None
    stored = db.get(Prompt, outcome.prompt.id)
    assert stored.batch_id == batch.id and stored.author_id == author.id and stored.category == "few-shot"
    assert stored.source_user_id == f"labeler:{author.id}" and stored.split in ("train", "valid", "test")
    assert stored.text == (
        "Reverse the word.\n\nQuery: cat\nResponse: tac\n\nQuery: dog\nResponse: god\n\nQuery: bird\nResponse:"
    )
    assert stored.extra["few_shot"]["examples"] == [
        {"query": "cat", "response": "tac"},
        {"query": "dog", "response": "god"},
    ]
    assert stored.normalized_key == normalized_key(stored.text)
    # A draft batch just holds it: no task and no sampling run until the admin starts the batch.
    assert count(db, Task, Task.prompt_id == stored.id) == 0 and count(db, TrainingRun) == 0
    assert "when the batch starts" in outcome.next_step


def test_a_duplicate_of_any_stored_prompt_is_dropped_and_nothing_is_stored(db):
    other = make_batch(db, allow=False)
    store_prompt(db, other, "What is the capital of France?")
    batch = make_batch(db)
    before = count(db, Prompt)
    outcome = writing.write_prompt(db, UserFactory(), batch.id, Draft(text="  what is the capital of   FRANCE?"))
    assert not outcome.kept and outcome.rule == "duplicate"
    assert outcome.message == "dropped: duplicate of an existing prompt"
    assert count(db, Prompt) == before


def test_the_batch_prefix_rule_and_per_user_cap_come_from_its_import(db):
    batch = make_batch(db, hygiene_config={"prefix_chars": 20, "max_per_user": 2})
    store_prompt(db, batch, "Translate to German: good morning", prefix_chars=20)
    a, b = UserFactory(), UserFactory()
    near = writing.write_prompt(db, a, batch.id, Draft(text="Translate to German: good night"))
    assert not near.kept and near.rule == "shared_prefix"
    assert near.message == "dropped: it starts with the same 20 characters as an existing prompt"
    kept = [writing.write_prompt(db, a, batch.id, Draft(text=f"Count to {n} in French.")).kept for n in (3, 4, 5)]
    assert kept == [True, True, False]
    capped = writing.write_prompt(db, a, batch.id, Draft(text="Name a prime above 50."))
    assert capped.rule == "over_user_limit" and "limit of 2 prompts per person" in capped.message
    # The cap is per labeler: another one still writes.
    assert writing.write_prompt(db, b, batch.id, Draft(text="Name a prime above 50.")).kept
    assert count(db, Prompt, Prompt.source_user_id == f"labeler:{a.id}") == 2


@pytest.mark.parametrize(
    ("policy", "kept", "stored_text", "message"),
    [
        ("drop", False, None, "dropped: it contains personal data (email), which this batch does not accept"),
        (
            "redact",
            True,
            "Write to [EMAIL] about the refund.",
            "kept, with personal data replaced by tags such as [EMAIL]",
        ),
        ("flag", True, "Write to ann@example.com about the refund.", "kept, flagged for personal data (email)"),
    ],
)
def test_personal_data_follows_the_batch_policy(db, policy, kept, stored_text, message):
    batch = make_batch(db, pii_policy=policy)
    draft = Draft(text="Write to ann@example.com about the refund.")
    outcome = writing.write_prompt(db, UserFactory(), batch.id, draft)
    assert outcome.kept is kept and outcome.message == message
    if kept:
        stored = db.get(Prompt, outcome.prompt.id)
        assert stored.text == stored_text and stored.pii_flags == ["email"]
    else:
        assert outcome.rule == "pii" and count(db, Prompt, Prompt.batch_id == batch.id) == 0


def test_only_batches_that_allow_it_and_still_collect_take_prompts(db):
    closed = make_batch(db, allow=False)
    done = make_batch(db, status="completed")
    open_ = make_batch(db, status="labeling")
    assert [b.id for b in writing.writable_batches(db)] == [open_.id]
    with pytest.raises(writing.PromptWritingError) as refused:
        writing.write_prompt(db, UserFactory(), closed.id, Draft(text="Hello there"))
    assert refused.value.field == "batch_id" and refused.value.status == 422
    with pytest.raises(writing.PromptWritingError) as late:
        writing.write_prompt(db, UserFactory(), done.id, Draft(text="Hello there"))
    assert late.value.status == 409 and "completed" in str(late.value)


def test_in_a_labeling_batch_the_prompt_gets_a_demonstration_task_and_a_follow_up_sample_run(db):
    model = ModelVersionFactory(status="promoted")
    batch = make_batch(db, status="labeling")
    author, demonstrator = UserFactory(), UserFactory()
    first = writing.write_prompt(db, author, batch.id, Draft(text="List three even numbers."))
    second = writing.write_prompt(db, author, batch.id, Draft(text="List three odd numbers."))
    # One queued sample run serves both: it reads the prompts needing samples when it starts.
    runs = db.scalars(select(TrainingRun).where(TrainingRun.batch_id == batch.id)).all()
    assert [(r.kind, r.status, r.triggered_by) for r in runs] == [("sample", "queued", "prompt-writing")]
    assert first.sample_run_id == second.sample_run_id == runs[0].id
    # The demonstration task exists at once and is leased like any other.
    lease = leases.lease_next_task(db, demonstrator, "demonstration")
    assert lease is not None and db.get(Task, lease.task_id).prompt_id == first.prompt.id
    # What the run does: sample the written prompts (only those) and open their ranking tasks.
    todo = prompts_needing_samples(db, batch, model.id)
    assert [pid for pid, _ in todo] == [first.prompt.id, second.prompt.id]
    store_samples(db, model.id, {pid: [f"out {i}" for i in range(4)] for pid, _ in todo}, {})
    open_for_labeling(db, batch)
    assert count(db, Task, Task.batch_id == batch.id, Task.kind == "ranking") == 2
    assert leases.lease_next_task(db, demonstrator, "ranking") is not None


def test_a_batch_that_only_wants_demonstrations_needs_no_sampling(db):
    batch = make_batch(db, status="labeling", rankings=False)
    outcome = writing.write_prompt(db, UserFactory(), batch.id, Draft(text="Explain rain to a child."))
    assert outcome.sample_run_id is None and count(db, TrainingRun) == 0
    assert count(db, Task, Task.prompt_id == outcome.prompt.id, Task.kind == "demonstration") == 1


# --- the page -----------------------------------------------------------------------------------


def form_of(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_the_page_lists_writable_batches_and_the_home_links_to_it(client, login, db):
    login(UserFactory().username)
    assert 'data-testid="write-prompts"' not in client.get("/label").text
    assert 'data-testid="no-batches"' in client.get("/label/write").text
    hidden = make_batch(db, allow=False)
    shown = make_batch(db, guidelines="Prompts about <b>maths</b>, **please**")
    home = client.get("/label")
    assert 'data-testid="write-prompts"' in home.text and 'href="/label/write"' in home.text
    page = client.get("/label/write?category=few-shot")
    assert page.status_code == 200 and shown.name in page.text and hidden.name not in page.text
    assert page.text.count('name="example_query"') == 3 and 'data-testid="field-instruction"' in page.text
    assert "Prompts about &lt;b&gt;maths&lt;/b&gt;, <strong>please</strong>" in page.text
    assert not re.search(r"\sstyle=|\son[a-z]+=|<script", page.text)


def test_writing_through_the_form_shows_the_hygiene_outcome(client, login, db):
    batch = make_batch(db)
    csrf = login(UserFactory().username)
    data = {
        "csrf_token": csrf,
        "batch_id": str(batch.id),
        "category": "plain",
        "text": "Say <script>alert(1)</script> twice",
        "action": "submit",
    }
    kept = client.post("/label/write", data=data)
    assert kept.status_code == 200 and 'data-kept="true"' in kept.text
    assert "Say &lt;script&gt;alert(1)&lt;/script&gt; twice" in kept.text and "<script>alert" not in kept.text
    assert 'data-testid="field-text"></textarea>' in kept.text  # a fresh form for the next prompt
    again = client.post("/label/write", data=data)
    assert again.status_code == 200 and 'data-kept="false"' in again.text
    assert "Dropped: duplicate of an existing prompt" in again.text
    assert count(db, Prompt, Prompt.batch_id == batch.id) == 1


def test_form_errors_are_422_naming_the_field_and_keep_what_was_typed(client, login, db):
    batch = make_batch(db)
    csrf = login(UserFactory().username)
    data = {
        "csrf_token": csrf,
        "batch_id": str(batch.id),
        "category": "few-shot",
        "instruction": "Double it.",
        "example_query": ["2", "5", ""],
        "example_response": ["4", "", ""],
        "action": "submit",
    }
    response = client.post("/label/write", data=data)
    assert response.status_code == 422
    assert "examples[1].response: write the response to this query" in response.text
    assert 'data-field="examples[1].response"' in response.text and ">Double it.</textarea>" in response.text
    assert 'aria-invalid="true">' in response.text.split('field-example_response-1"')[1][:80]
    more = client.post("/label/write", data=data | {"action": "add_example"})
    assert more.status_code == 200 and more.text.count('name="example_query"') == 4
    assert count(db, Prompt) == 0
    missing = client.post("/label/write", data={"csrf_token": csrf, "category": "plain", "text": "hi"})
    assert missing.status_code == 422 and "batch_id: choose a batch" in missing.text


def test_the_form_needs_csrf_and_a_labeler(client, login, db):
    batch = make_batch(db)
    assert client.get("/label/write", follow_redirects=False).headers["location"].startswith("/login")
    login(UserFactory().username)
    refused = client.post(
        "/label/write", data={"batch_id": str(batch.id), "text": "Hello"}, headers={"accept": "text/html"}
    )
    assert refused.status_code == 403 and count(db, Prompt) == 0
    client.cookies.clear()
    login(AdminFactory().username)
    assert client.get("/label/write", headers={"accept": "text/html"}).status_code == 403


# --- the API ------------------------------------------------------------------------------------


def bearer(db, user=None, scopes=("label",)) -> dict[str, str]:
    raw, _ = create_api_token(db, user or UserFactory(), list(scopes))
    return {"Authorization": f"Bearer {raw}"}


def test_api_writes_prompts_201_when_kept_and_200_when_dropped(client, db):
    batch = make_batch(db)
    headers = bearer(db)
    body = {
        "batch_id": batch.id,
        "category": "user-based",
        "use_case": "Support desk triage",
        "text": "Classify this ticket as billing or technical: 'my card was charged twice'",
    }
    created = client.post("/api/v1/prompts/written", json=body, headers=headers)
    assert created.status_code == 201, created.text
    out = created.json()
    assert out["kept"] and out["category"] == "user-based" and out["rule"] is None
    assert db.get(Prompt, out["prompt_id"]).extra["use_case"] == "Support desk triage"
    duplicate = client.post("/api/v1/prompts/written", json=body, headers=bearer(db))
    assert duplicate.status_code == 200
    assert duplicate.json()["prompt_id"] is None and not duplicate.json()["kept"]
    assert duplicate.json()["message"] == "dropped: duplicate of an existing prompt"
    listed = client.get("/api/v1/prompts/writable-batches", headers=headers).json()
    assert [b["id"] for b in listed] == [batch.id]


def test_api_errors_name_the_field(client, db):
    batch = make_batch(db)
    headers = bearer(db)
    few_shot = {
        "batch_id": batch.id,
        "category": "few-shot",
        "instruction": "Spell it backwards.",
        "examples": [{"query": "abc", "response": "cba"}, {"query": "xy", "response": ""}],
    }
    response = client.post("/api/v1/prompts/written", json=few_shot, headers=headers)
    assert response.status_code == 422 and response.json()["detail"].startswith("examples[1].response: ")
    unknown = client.post("/api/v1/prompts/written", json={"batch_id": 10**9, "text": "hi"}, headers=headers)
    assert unknown.status_code == 422 and unknown.json()["detail"].startswith("batch_id: ")
    malformed = client.post("/api/v1/prompts/written", json={"text": "hi"}, headers=headers)
    assert malformed.status_code == 422 and malformed.json()["errors"][0]["field"] == "batch_id"
    assert client.post("/api/v1/prompts/written", json={"batch_id": batch.id, "text": "hi"}).status_code == 401
    export_only = bearer(db, AdminFactory(), ("export:read",))
    assert (
        client.post(
            "/api/v1/prompts/written", json={"batch_id": batch.id, "text": "hi"}, headers=export_only
        ).status_code
        == 403
    )
    assert count(db, Prompt) == 0


# --- concurrency (PostgreSQL) ---------------------------------------------------------------------


def test_labelers_writing_the_same_prompt_at_once_store_it_once(committed_session):
    from app.db import get_sessionmaker
    from app.models import User

    batch = make_batch(committed_session)
    users = [User(username=f"writer{i}", role="labeler", password_hash="!") for i in range(8)]
    committed_session.add_all(users)
    committed_session.commit()
    ids, batch_id = [u.id for u in users], batch.id
    start = threading.Barrier(len(ids))

    def write(user_id: int) -> bool:
        with get_sessionmaker()() as db:
            author = db.get(User, user_id)
            start.wait()
            outcome = writing.write_prompt(db, author, batch_id, Draft(text="What rhymes with orange?"))
            db.commit()
            return outcome.kept

    with ThreadPoolExecutor(len(ids)) as pool:
        kept = list(pool.map(write, ids))
    assert kept.count(True) == 1
    assert committed_session.scalar(select(func.count()).select_from(Prompt).where(Prompt.batch_id == batch_id)) == 1
