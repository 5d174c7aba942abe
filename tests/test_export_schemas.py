"""The rankings schemas `kto` and `kway`, and `margin` on comparisons, on conversations (PostgreSQL and SQLite)."""

from __future__ import annotations

import json

import pytest

from tests.test_conversations import CONVERSATION, conversation_world


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def rows_of(db, kind, schema="trl", cursor=None, margin=None) -> list[dict]:
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
            margin=margin,
            cursor=parse_cursor(kind, cursor, schema) if cursor else None,
        )
    )
    return [json.loads(line) for line in body.decode().splitlines()]


def kto_world(db):
    """Rankings of one multi-turn prompt that exercise each branch of the KTO rule, ties and Likert included."""
    from app.models import Prompt
    from tests.test_export import add_batch, add_ranking, add_task, add_user, add_version

    batch, labeler, other = add_batch(db), add_user(db), add_user(db)
    task = add_task(db, batch, 4, text="And doubled?")
    db.get(Prompt, task.prompt_id).messages = CONVERSATION
    version = add_version(db, "policy-v1")
    texts = ["8", "eight", "6", "<b>4</b>"]
    rankings = {
        # best L6 -> true; middle L5 -> out; middle L3 -> false; worst L4 -> false
        "plain": add_ranking(
            db,
            batch,
            labeler,
            [1, 2, 2, 3],
            task=task,
            texts=texts,
            likerts=[6, 5, 3, 4],
            versions=[version, None, version, None],
            flags={3: ["harmful"]},
        ),
        # two tied best (L5 -> true, L4 -> out), two tied worst (L5 -> out, L2 -> false)
        "ties": add_ranking(db, batch, other, [1, 1, 2, 2], likerts=[5, 4, 5, 2]),
        # one group: best is worst, so only Likert decides: 7 -> true, 4 -> out, 3 -> false, 5 -> true
        "all_tied": add_ranking(db, batch, labeler, [1, 1, 1, 1], likerts=[7, 4, 3, 5]),
        # marked all unacceptable: every output false, whatever its Likert
        "unacceptable": add_ranking(db, batch, labeler, [1, 2, 3, 4], likerts=[7, 6, 5, 4], all_unacceptable=True),
    }
    return rankings


@pytest.mark.sqlite
def test_kto_labels_each_ranked_output_once_by_the_documented_rule(db, backend):
    from app.export.schemas import kto_label

    rankings = kto_world(db)
    rows = rows_of(db, "rankings", "kto")
    by_ranking = {name: [r for r in rows if r["ranking_id"] == ranking.id] for name, ranking in rankings.items()}
    plain = by_ranking["plain"]
    assert [(r["completion"], r["label"], r["rank"], r["likert"]) for r in plain] == [
        (_assistant("8"), True, 1, 6),
        (_assistant("6"), False, 2, 3),
        (_assistant("<b>4</b>"), False, 3, 4),
    ]
    assert all(r["prompt"] == CONVERSATION for r in plain)
    assert plain[0]["model_version"] == "policy-v1" and plain[2]["flags"] == ["harmful"]
    assert [r["cursor"] for r in plain] == [f"{rankings['plain'].id}:{n}" for n in range(3)]
    assert {"labeler", "split", "batch", "prompt_id", "task_id", "completion_id", "submitted_at"} <= set(plain[0])
    assert [(r["likert"], r["label"]) for r in by_ranking["ties"]] == [(5, True), (2, False)]
    assert [(r["likert"], r["label"]) for r in by_ranking["all_tied"]] == [(7, True), (3, False), (5, True)]
    assert [r["label"] for r in by_ranking["unacceptable"]] == [False] * 4
    # Each labeled output appears once: no (ranking, completion) twice.
    assert len({(r["ranking_id"], r["completion_id"]) for r in rows}) == len(rows) == 3 + 2 + 3 + 4
    assert kto_label(2, 6, 1, 3, False) is None and kto_label(3, 5, 1, 3, False) is None
    # A cursor inside a ranking resumes after that row; a ranking id resumes after the whole ranking.
    assert rows_of(db, "rankings", "kto", cursor=rows[1]["cursor"]) == rows[2:]
    assert rows_of(db, "rankings", "kto", cursor=str(rankings["plain"].id)) == rows[3:]


@pytest.mark.sqlite
def test_kway_is_the_rankings_row_with_the_conversation_and_authors(db, backend):
    rankings = kto_world(db)
    default = rows_of(db, "rankings")
    kway = rows_of(db, "rankings", "kway")
    assert len(kway) == len(default) == 4
    first = kway[0]
    assert first["ranking_id"] == rankings["plain"].id and first["messages"] == CONVERSATION and first["k"] == 4
    assert [(c["text"], c["rank"], c["likert"], c["author"]) for c in first["completions"]] == [
        ("8", 1, 6, "model"),
        ("eight", 2, 5, "human"),
        ("6", 2, 3, "model"),
        ("<b>4</b>", 3, 4, "human"),
    ]
    assert first["completions"][3]["flags"] == ["harmful"]
    # Lossless: the default rankings row, with the conversation in place of the prompt's text and authors added.
    for row, plain in zip(kway, default, strict=True):
        assert "prompt" not in row
        assert {k: v for k, v in row.items() if k != "messages"} | {"prompt": plain["prompt"]} == plain | {
            "completions": row["completions"]
        }
        assert [{k: v for k, v in c.items() if k != "author"} for c in row["completions"]] == plain["completions"]
    assert rows_of(db, "rankings", "kway", cursor=kway[1]["cursor"]) == kway[2:]


@pytest.mark.sqlite
def test_margin_on_pairs_is_the_rank_distance_or_likert_difference(db, backend):
    from tests.test_export import add_batch, add_ranking, add_user

    world = conversation_world(db)
    add_ranking(db, add_batch(db), add_user(db), [1, 2, 3, 4], likerts=[6, 7, 2, 2])
    default = rows_of(db, "comparisons")
    for schema in ("trl", "trl_chat", "openai", "hh_rlhf"):
        plain = rows_of(db, "comparisons", schema)
        for margin in ("rank", "likert"):
            rows = rows_of(db, "comparisons", schema, margin=margin)
            assert [{k: v for k, v in r.items() if k != "margin"} for r in rows] == plain
            expected = [
                r["rejected_rank"] - r["chosen_rank"] if margin == "rank" else r["chosen_likert"] - r["rejected_likert"]
                for r in default
            ]
            assert [r["margin"] for r in rows] == expected
    multi = world["rankings"]["multi"].id
    ranked = [r for r in rows_of(db, "comparisons", "trl_chat", margin="rank") if r["ranking_id"] == multi]
    assert [r["margin"] for r in ranked] == [1, 1, 2, 1, 1]  # ranks 1,2,2,3: ties give no pair
    likert = rows_of(db, "comparisons", margin="likert")
    assert {-1, 0, 5} <= {r["margin"] for r in likert}  # Likert can disagree with the ranking: kept, negative
    resumed = rows_of(db, "comparisons", "trl_chat", cursor=default[2]["cursor"], margin="rank")
    assert resumed == rows_of(db, "comparisons", "trl_chat", margin="rank")[3:]


@pytest.mark.parametrize(
    ("kind", "query", "message"),
    [
        ("comparisons", "schema=kto", "schema: kto applies to the rankings export"),
        ("demonstrations", "schema=kway", "schema: kway applies to the rankings export"),
        ("rankings", "schema=kway&format=csv", "schema: kway rows hold lists of messages"),
        ("rankings", "schema=kto&aggregate=consensus", "schema: a consensus is exported as it is"),
        ("comparisons", "margin=distance", "margin: must be one of rank, likert"),
        ("rankings", "margin=rank", "margin: applies to the comparisons export"),
        ("demonstrations", "margin=likert", "margin: applies to the comparisons export"),
        ("comparisons", "margin=rank&format=csv", "margin: is given in JSON Lines only"),
        ("rankings", "schema=kway&cursor=1:0", "cursor: expected a row id"),
    ],
)
def test_bad_kto_kway_and_margin_requests_name_the_parameter(client, db, kind, query, message):
    from app.security import create_api_token
    from tests.test_export import add_user

    token, _ = create_api_token(db, add_user(db, "admin"), ["export:read"])
    response = client.get(f"/api/v1/export/{kind}?{query}", headers={"authorization": f"Bearer {token}"})
    assert response.status_code in (400, 422), response.text
    assert response.json()["detail"].startswith(message), response.json()


def test_the_cli_exports_kto_kway_and_margin_from_postgresql(committed_session, tmp_path):
    from tests.test_cli import instructloop

    kto_world(committed_session)
    committed_session.commit()
    out = tmp_path / "kto.jsonl"
    done = instructloop("export", "rankings", "--out", str(out), "--schema", "kto")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows][:3] == [True, False, False] and rows[0]["prompt"] == CONVERSATION
    done = instructloop("export", "rankings", "--out", str(out), "--schema", "kway")
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text().splitlines()[0])["messages"] == CONVERSATION
    done = instructloop("export", "comparisons", "--out", str(out), "--schema", "trl_chat", "--margin", "likert")
    assert done.returncode == 0, done.stderr
    assert all(isinstance(json.loads(line)["margin"], int) for line in out.read_text().splitlines())
    bad = instructloop("export", "comparisons", "--out", str(out), "--margin", "nope")
    assert bad.returncode == 2 and "margin: must be one of" in bad.stdout + bad.stderr


@pytest.mark.sqlite(only=True)
def test_http_export_takes_kto_kway_and_margin(client, db):
    from app.security import create_api_token
    from tests.test_export import add_user

    kto_world(db)
    token, _ = create_api_token(db, add_user(db, "admin"), ["export:read"])
    db.commit()
    auth = {"authorization": f"Bearer {token}"}
    for kind, query, schema, margin in (
        ("rankings", "schema=kto", "kto", None),
        ("rankings", "schema=kway", "kway", None),
        ("comparisons", "schema=openai&margin=likert", "openai", "likert"),
        ("comparisons", "margin=rank", "trl", "rank"),
    ):
        response = client.get(f"/api/v1/export/{kind}?{query}", headers=auth)
        assert response.status_code == 200, response.text
        rows = [json.loads(line) for line in response.text.splitlines()]
        assert rows and rows == rows_of(db, kind, schema, margin=margin)
