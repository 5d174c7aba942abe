"""Conversations as prompts: the shape rule, the migration that makes every prompt one, and the import."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from app.conversations import conversation_problems, last_user_text, validate_messages
from app.errors import Invalid
from tests.conftest import PG_ADMIN_URL


def test_migration_0006_turns_every_prompt_into_a_conversation_and_back_on_postgresql():
    """Rows stored before 0006 become one-message conversations; downgrading keeps their text."""
    from alembic import command
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from app.db import alembic_config
    from app.models import PromptBatch

    name = f"instructloop_conv_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = create_engine(url)
    texts = ["What is 2 + 2?", "Say 'hi' with \"quotes\", a \\ backslash\nand a newline: ünïcode 🙂", "x" * 5000]
    try:
        config = alembic_config(url)
        command.upgrade(config, "0005")
        with Session(engine) as session:
            batch = PromptBatch(name="before-conversations")
            session.add(batch)
            session.flush()
            for i, t in enumerate(texts):
                session.execute(
                    text(
                        "INSERT INTO prompts (batch_id, text, category, split, normalized_key, metadata, pii_flags,"
                        " created_at) VALUES (:b, :t, 'plain', 'train', :k, '{}', '[]', now())"
                    ),
                    {"b": batch.id, "t": t, "k": f"{i:064x}"},
                )
            session.commit()
        command.upgrade(config, "0006")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT text, messages FROM prompts ORDER BY id")).all()
            nullable = conn.execute(
                text(
                    "SELECT is_nullable FROM information_schema.columns WHERE table_name = 'prompts'"
                    " AND column_name = 'messages'"
                )
            ).scalar_one()
        assert [(r.text, r.messages) for r in rows] == [(t, [{"role": "user", "content": t}]) for t in texts]
        assert nullable == "NO"
        with engine.begin() as conn:  # a multi-turn prompt written under 0006
            conn.execute(
                text(
                    "INSERT INTO prompts (batch_id, text, messages, category, split, normalized_key, metadata,"
                    " pii_flags, created_at) SELECT batch_id, 'and doubled?', CAST(:m AS jsonb), 'plain', 'train',"
                    " repeat('f', 64), '{}', '[]', now() FROM prompts LIMIT 1"
                ),
                {
                    "m": '[{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"},'
                    '{"role":"user","content":"and doubled?"}]'
                },
            )
        command.downgrade(config, "0005")
        with engine.connect() as conn:
            columns = (
                conn.execute(text("SELECT column_name FROM information_schema.columns WHERE table_name = 'prompts'"))
                .scalars()
                .all()
            )
            after = conn.execute(text("SELECT text FROM prompts ORDER BY id")).scalars().all()
        assert "messages" not in columns
        assert after == [*texts, "and doubled?"]
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM prompts WHERE messages IS NULL")).scalar_one() == 0
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.sqlite
def test_a_prompt_written_with_text_only_is_a_one_message_conversation(db, backend):
    from sqlalchemy import insert, select

    from app.models import Prompt
    from tests.factories import BatchFactory, PromptFactory

    prompt = PromptFactory(batch=BatchFactory(), text="Reverse abc.")
    db.refresh(prompt)
    assert prompt.messages == [{"role": "user", "content": "Reverse abc."}]
    batch = BatchFactory()
    db.execute(insert(Prompt), [{"batch_id": batch.id, "text": t, "normalized_key": t * 64} for t in "ab"])
    stored = db.scalars(select(Prompt.messages).where(Prompt.batch_id == batch.id).order_by(Prompt.id)).all()
    assert stored == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]


GOOD = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "x2?"}],
]


@pytest.mark.parametrize("messages", GOOD)
def test_valid_conversations_pass(messages):
    assert conversation_problems(messages) == []
    assert validate_messages(messages) == messages


@pytest.mark.parametrize(
    ("messages", "field", "message"),
    [
        ("hi", "messages", "must be a list of messages"),
        ([], "messages", "must hold at least one message"),
        (["hi"], "messages[0]", 'must be an object with "role" and "content"'),
        ([{"role": "bot", "content": "x"}], "messages[0].role", "must be one of system, user, assistant"),
        ([{"role": "user", "content": "  "}], "messages[0].content", "is empty"),
        ([{"role": "user", "content": 3}], "messages[0].content", "must be a string"),
        ([{"role": "user", "content": "x", "name": "a"}], "messages[0].name", "unknown key"),
        ([{"role": "system", "content": "x"}], "messages", "must end with a user message"),
        ([{"role": "assistant", "content": "x"}], "messages[0].role", "must be user"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "messages[1].role",
            "must be assistant",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "messages[1].role",
            "system may only be the first message",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "messages[1].role",
            "must be user: a conversation ends with a user message",
        ),
    ],
)
def test_invalid_conversations_name_the_field(messages, field, message):
    with pytest.raises(Invalid) as caught:
        validate_messages(messages)
    assert caught.value.field == field
    assert message in caught.value.message


def test_last_user_text_is_the_question():
    assert last_user_text(GOOD[2]) == "x2?"


# -- import ---------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And doubled?"},
]


def _jsonl(*objects) -> bytes:
    import json

    return "".join(json.dumps(o) + "\n" for o in objects).encode()


def test_jsonl_import_reads_messages_beside_text():
    from app.collection.prompt_import import parse_prompts

    result = parse_prompts(_jsonl({"messages": CONVERSATION, "source_user_id": "u1"}, {"text": "Hi"}), "jsonl")
    assert result.ok
    conversation, single = result.rows
    assert conversation.messages == CONVERSATION and conversation.text == "And doubled?"
    assert conversation.source_user_id == "u1"
    assert single.messages is None and single.text == "Hi"


def test_jsonl_import_errors_are_line_numbered_and_name_the_message_field():
    from app.collection.prompt_import import parse_prompts

    bad_role = [*CONVERSATION[:2], {"role": "bot", "content": "4"}, CONVERSATION[3]]
    data = _jsonl(
        {"text": "fine"},
        {"messages": CONVERSATION, "text": "both"},
        {"messages": bad_role},
        {"messages": [{"role": "user", "content": ""}]},
        {"messages": CONVERSATION[:3]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "x" * 11}]},
    )
    result = parse_prompts(data, "jsonl", max_text_chars=10)
    assert not result.ok and result.rows[0].text == "fine"
    got = [(e.line, e.field, e.message) for e in result.errors]
    assert got == [
        (2, "text", "give either text or messages, not both"),
        (2, "messages[0].content", "has 15 characters; the maximum is 10"),
        (2, "messages[1].content", "has 14 characters; the maximum is 10"),
        (2, "messages[3].content", "has 12 characters; the maximum is 10"),
        (3, "messages[2].role", "must be one of system, user, assistant"),
        (4, "messages[0].content", "is empty"),
        (5, "messages[2].role", "must be user: a conversation ends with a user message"),
        (6, "messages", "must be a list of messages"),
        (7, "messages[0].content", "has 11 characters; the maximum is 10"),
    ]


def _hygiene(rows, **config):
    from app.collection.hygiene import HygieneConfig, apply_hygiene

    return apply_hygiene(rows, existing_keys=set(), config=HygieneConfig(**config))


def _row(line, messages=None, text=None, user=None):
    from app.collection.prompt_import import PromptRow

    if messages is not None:
        text = [m for m in messages if m["role"] == "user"][-1]["content"]
    return PromptRow(line, text, user, "plain", {}, messages)


def test_hygiene_finds_pii_in_every_turn_and_redacts_each():
    earlier_email = [
        {"role": "user", "content": "Mail me at ann@example.com"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Now summarise."},
    ]
    dropped = _hygiene([_row(1, earlier_email)])
    assert dropped.kept == [] and dropped.dropped[0].rule == "pii"
    redacted = _hygiene([_row(1, earlier_email)], pii_policy="redact").kept[0]
    assert redacted.messages[0]["content"] == "Mail me at [EMAIL]"
    assert redacted.messages[2]["content"] == redacted.text == "Now summarise."
    assert redacted.pii_flags == ["email"]


def test_hygiene_dedupes_over_the_whole_conversation():
    from app.collection.hygiene import normalized_key

    other_history = [{"role": "user", "content": "What is 3 + 3?"}, *CONVERSATION[2:]]
    result = _hygiene(
        [
            _row(1, CONVERSATION),
            _row(2, other_history),  # same last question, other history: not a duplicate
            _row(3, [dict(m, content=m["content"].upper()) for m in CONVERSATION]),  # same after normalising
            _row(4, text="And doubled?"),  # the last question alone is another prompt
            _row(5, [{"role": "user", "content": "and  DOUBLED?"}]),  # a one-message conversation is its text
        ],
        prefix_chars=None,
    )
    assert [p.line for p in result.kept] == [1, 2, 4]
    assert [(d.line, d.rule) for d in result.dropped] == [(3, "duplicate"), (5, "duplicate")]
    assert result.kept[2].normalized_key == normalized_key("And doubled?")
    assert result.kept[2].messages == [{"role": "user", "content": "And doubled?"}]


def test_hygiene_caps_and_splits_conversations_by_source_user():
    rows = [
        _row(
            i,
            [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": f"then {i}?"},
            ],
            user="u1" if i < 4 else "u2",
        )
        for i in range(1, 7)
    ]
    result = _hygiene(rows, max_per_user=2, prefix_chars=None)
    assert [p.line for p in result.kept] == [1, 2, 4, 5]
    assert {d.rule for d in result.dropped} == {"over_user_limit"}
    splits = {p.source_user_id: set() for p in result.kept}
    for p in result.kept:
        splits[p.source_user_id].add(p.split)
    assert all(len(s) == 1 for s in splits.values())


@pytest.mark.sqlite
def test_import_stores_conversations_all_or_nothing(db, backend):
    from sqlalchemy import select

    from app.collection.batches import import_prompts
    from app.models import Prompt
    from tests.factories import BatchFactory

    batch = BatchFactory()
    bad = _jsonl({"messages": CONVERSATION}, {"messages": [{"role": "assistant", "content": "hi"}]})
    outcome = import_prompts(db, batch, bad, "jsonl")
    assert outcome.errors["errors"] == [
        {
            "line": 2,
            "field": "messages[0].role",
            "message": "must be user: after an optional system message, user and assistant alternate",
        }
    ]
    assert db.scalars(select(Prompt).where(Prompt.batch_id == batch.id)).all() == []
    outcome = import_prompts(db, batch, _jsonl({"messages": CONVERSATION}, {"text": "Hi there"}), "jsonl")
    assert not outcome.errors and outcome.stored == 2
    stored = db.execute(
        select(Prompt.text, Prompt.messages).where(Prompt.batch_id == batch.id).order_by(Prompt.source_line)
    ).all()
    assert [tuple(r) for r in stored] == [
        ("And doubled?", CONVERSATION),
        ("Hi there", [{"role": "user", "content": "Hi there"}]),
    ]


@pytest.mark.sqlite
def test_the_sampling_job_is_given_the_whole_conversation(db, backend):
    from app.collection.batches import import_prompts
    from app.collection.sampling import prompts_needing_samples
    from tests.factories import BatchFactory, ModelVersionFactory

    batch = BatchFactory()
    assert not import_prompts(db, batch, _jsonl({"messages": CONVERSATION}, {"text": "Hi there"}), "jsonl").errors
    policy = ModelVersionFactory()
    todo = prompts_needing_samples(db, batch, policy.id)
    assert [messages for _, messages in todo] == [CONVERSATION, [{"role": "user", "content": "Hi there"}]]


# -- training data --------------------------------------------------------------------------------


def conversation_world(db):
    """A batch with a multi-turn prompt that has a demonstration and a ranking, and a single-turn one likewise."""
    from app.models import Prompt, Task
    from tests.test_export import add_batch, add_demonstration, add_ranking, add_task, add_user

    batch, labeler = add_batch(db), add_user(db)
    multi = add_task(db, batch, 4, text="And doubled?")
    prompt = db.get(Prompt, multi.prompt_id)
    prompt.messages = CONVERSATION
    single = add_task(db, batch, 4, text="Sort 3 1 2")
    db.flush()
    rankings = {
        "multi": add_ranking(db, batch, labeler, [1, 2, 2, 3], task=multi, texts=["8", "eight", "6", "<b>4</b>"]),
        "single": add_ranking(db, batch, labeler, [2, 1, 3, 4], task=single, texts=["1 2 3", "123", "3", "x"]),
    }
    demos = {}
    for name, task in (("multi", multi), ("single", single)):
        demo_task = Task(batch_id=batch.id, prompt_id=task.prompt_id, kind="demonstration", needed=1)
        db.add(demo_task)
        db.flush()
        demos[name] = add_demonstration(db, batch, labeler, "8" if name == "multi" else "1 2 3", task=demo_task)
    return {"batch": batch, "rankings": rankings, "demos": demos, "prompt": prompt}


@pytest.mark.sqlite
def test_trainers_get_the_conversation_of_a_multi_turn_prompt_and_the_text_of_a_single_turn_one(db, backend):
    from app.training import data as training

    conversation_world(db)
    demos, _ = training.demonstrations(db)
    assert demos["train"] == [(CONVERSATION, "8"), ("Sort 3 1 2", "1 2 3")]
    rankings, _ = training.rankings(db)
    assert [r.prompt for r in rankings["train"]] == [CONVERSATION, "Sort 3 1 2"]
    assert training.prompts_for_ppo(db, "train") == [CONVERSATION, "Sort 3 1 2"]


# -- export schemas -------------------------------------------------------------------------------


def export_rows(db, kind, schema, cursor=None) -> list[dict]:
    """Exports through the service on the test's own connection in a schema; returns parsed rows."""
    import json

    from app.config import get_settings
    from app.export.stream import export_chunks, parse_cursor, resolve_filters

    conn, secret = db.connection(), get_settings().secret_key
    body = b"".join(
        export_chunks(
            conn,
            kind,
            resolve_filters(conn, kind, secret),
            secret_key=secret,
            schema=schema,
            cursor=parse_cursor(kind, cursor) if cursor else None,
        )
    )
    return [json.loads(line) for line in body.decode().splitlines()]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


HH_PROMPT = "Answer briefly.\n\nHuman: What is 2 + 2?\n\nAssistant: 4\n\nHuman: And doubled?"
PROVENANCE = {"ranking_id", "prompt_id", "task_id", "chosen_rank", "weight", "labeler", "split", "cursor"}


@pytest.mark.sqlite
def test_comparisons_of_a_conversation_in_every_schema(db, backend):
    world = conversation_world(db)
    default = export_rows(db, "comparisons", "trl")
    multi = [row for row in default if row["ranking_id"] == world["rankings"]["multi"].id]
    assert len(multi) == 5 and multi[0]["prompt"] == "And doubled?"  # trl is unchanged: the prompt's text
    pairs = [(row["chosen"], row["rejected"], row["cursor"]) for row in multi]
    assert pairs[0] == ("8", "eight", f"{world['rankings']['multi'].id}:0")

    chat = export_rows(db, "comparisons", "trl_chat")
    assert len(chat) == len(default) and [r["cursor"] for r in chat] == [r["cursor"] for r in default]
    first = chat[0]
    assert first["prompt"] == CONVERSATION
    assert (first["chosen"], first["rejected"]) == (_assistant("8"), _assistant("eight"))
    assert set(first) >= PROVENANCE and "completion" not in first
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in chat[:5]] == [p[:2] for p in pairs]
    assert chat[5]["prompt"] == [{"role": "user", "content": "Sort 3 1 2"}]  # single-turn: one user message

    openai = export_rows(db, "comparisons", "openai")
    assert openai[0] == {
        "input": {"messages": CONVERSATION},
        "preferred_output": _assistant("8"),
        "non_preferred_output": _assistant("eight"),
        "cursor": pairs[0][2],
    }
    assert openai[3]["non_preferred_output"] == _assistant("<b>4</b>")

    hh = export_rows(db, "comparisons", "hh_rlhf")
    assert hh[0]["chosen"] == HH_PROMPT + "\n\nAssistant: 8"
    assert hh[0]["rejected"] == HH_PROMPT + "\n\nAssistant: eight"
    assert set(hh[0]) >= PROVENANCE and "prompt" not in hh[0]
    assert hh[5]["chosen"] == "\n\nHuman: Sort 3 1 2\n\nAssistant: 123"

    # A cursor resumes a schema export exactly where the default one would.
    assert export_rows(db, "comparisons", "trl_chat", cursor=chat[2]["cursor"]) == chat[3:]


@pytest.mark.sqlite
def test_demonstrations_of_a_conversation_in_every_schema(db, backend):
    conversation_world(db)
    default = export_rows(db, "demonstrations", "trl")
    assert [(r["prompt"], r["completion"]) for r in default] == [("And doubled?", "8"), ("Sort 3 1 2", "1 2 3")]
    chat = export_rows(db, "demonstrations", "trl_chat")
    assert chat[0]["messages"] == [*CONVERSATION, *_assistant("8")]
    assert chat[1]["messages"] == [{"role": "user", "content": "Sort 3 1 2"}, *_assistant("1 2 3")]
    assert {"demonstration_id", "labeler", "split", "cursor"} <= set(chat[0]) and "prompt" not in chat[0]
    openai = export_rows(db, "demonstrations", "openai")
    assert openai[0] == {"messages": [*CONVERSATION, *_assistant("8")], "cursor": default[0]["cursor"]}
    hh = export_rows(db, "demonstrations", "hh_rlhf")
    assert (hh[0]["prompt"], hh[0]["completion"]) == (HH_PROMPT + "\n\nAssistant:", " 8")
    assert hh[0]["cursor"] == default[0]["cursor"]


@pytest.mark.parametrize(
    ("kind", "query", "message"),
    [
        ("comparisons", "schema=alpaca", "schema: must be one of trl, trl_chat, openai, hh_rlhf"),
        ("demonstrations", "schema=", "schema: must be one of"),
        ("comparisons", "schema=trl_chat&format=csv", "schema: trl_chat rows hold lists of messages"),
        ("rankings", "schema=openai", "schema: openai applies to the comparisons and demonstrations"),
    ],
)
def test_a_bad_schema_is_a_422_naming_schema(client, db, kind, query, message):
    from app.security import create_api_token
    from tests.test_export import add_user

    token, _ = create_api_token(db, add_user(db, "admin"), ["export:read"])
    response = client.get(f"/api/v1/export/{kind}?{query}", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(message), response.json()


@pytest.mark.sqlite(only=True)
def test_http_export_takes_the_schema_parameter(client, db):
    from app.security import create_api_token
    from tests.test_export import add_user

    conversation_world(db)
    token, _ = create_api_token(db, add_user(db, "admin"), ["export:read"])
    db.commit()
    auth = {"authorization": f"Bearer {token}"}
    for kind in ("comparisons", "demonstrations"):
        for schema in ("trl", "trl_chat", "openai", "hh_rlhf"):
            response = client.get(f"/api/v1/export/{kind}?schema={schema}", headers=auth)
            assert response.status_code == 200, response.text
            assert [json.loads(line) for line in response.text.splitlines()] == export_rows(db, kind, schema)
    plain = client.get("/api/v1/export/comparisons", headers=auth)
    assert plain.text == client.get("/api/v1/export/comparisons?schema=trl", headers=auth).text


def test_the_cli_exports_in_a_schema(committed_session, tmp_path):
    from tests.test_cli import instructloop

    conversation_world(committed_session)
    committed_session.commit()
    out = tmp_path / "pairs.jsonl"
    done = instructloop("export", "comparisons", "--out", str(out), "--schema", "openai")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["input"]["messages"] == CONVERSATION and rows[0]["preferred_output"] == _assistant("8")
    bad = instructloop("export", "comparisons", "--out", str(out), "--schema", "nope")
    assert bad.returncode == 2 and "schema: must be one of" in bad.stdout + bad.stderr


def test_the_labeling_api_gives_the_whole_conversation(client, db):
    from app.models import Prompt
    from app.security import create_api_token
    from tests.factories import UserFactory
    from tests.test_labeling import seed_batch

    batch = seed_batch(db, n_prompts=1, k=4)
    prompt = db.scalar(select(Prompt).where(Prompt.batch_id == batch.id))
    prompt.messages, prompt.text = CONVERSATION, "And doubled?"
    db.flush()
    raw, _ = create_api_token(db, UserFactory(), ["label"])
    task = client.get("/api/v1/tasks/next", headers={"Authorization": f"Bearer {raw}"}).json()
    assert (task["prompt"], task["messages"]) == ("And doubled?", CONVERSATION)


PROBE_TEMPLATE = "{{ messages[0]['content'] }}\n\nAnswer:"


@pytest.fixture
def probe_model_path(tmp_path):
    """The shipped world model with a probe chat template that renders only a conversation's FIRST message.

    Its greedy answer to a conversation is then its answer to the first question, which only reaches the model
    if the whole conversation does (the last message alone would give another answer).
    """
    import shutil

    from tests.conftest import ROOT

    path = tmp_path / "probe-model"
    shutil.copytree(ROOT / "models" / "world-base", path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": PROBE_TEMPLATE}))
    return path


@pytest.mark.slow
def test_the_sampling_job_samples_in_the_context_of_the_conversation(
    committed_session, celery_worker, probe_model_path
):
    """Through the real worker: a multi-turn prompt is sampled from its whole conversation, not its last message."""
    from app.collection.batches import create_batch, start_batch
    from app.models import Completion, Prompt
    from app.registry.versions import register_base_model
    from tests.conftest import wait_until
    from tests.test_jobs import _run_of
    from worker.generate import sample_completions
    from worker.modeling import load_model

    first = [{"role": "user", "content": "Reverse abc."}]
    conversation = [*first, {"role": "assistant", "content": "cba"}, {"role": "user", "content": "What is 2 + 2?"}]
    db = committed_session
    register_base_model(db, str(probe_model_path))
    batch = create_batch(
        db, name="conversation-sampling", k=4, wants_demonstrations=False, temperature=0.0, max_new_tokens=8
    )
    prompt = Prompt(batch_id=batch.id, text="What is 2 + 2?", messages=conversation, normalized_key="c" * 64)
    db.add(prompt)
    db.flush()
    start_batch(db, batch)
    db.commit()
    run = wait_until(
        lambda: (r := _run_of(db, batch.id)) and r.status in ("succeeded", "failed") and r,
        timeout=120,
        message="the sampling run to finish",
    )
    assert run.status == "succeeded", run.error
    stored = db.scalars(select(Completion.text).where(Completion.prompt_id == prompt.id)).all()
    model, tokenizer = load_model(probe_model_path, device="cpu")
    settings = {"temperature": 0.0, "top_p": 0.95, "max_new_tokens": 8}
    ((of_first,), (of_last,)) = (
        set(sample_completions(model, tokenizer, [p], 4, **settings)[0]) for p in (first, "What is 2 + 2?")
    )
    assert of_first != of_last  # the probe tells the two apart
    assert set(stored) == {of_first}
