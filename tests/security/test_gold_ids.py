"""Also found: gold task ids were guessable from neighbouring ids.

A gold check is an older task of the same batch, so its task, prompt and
output ids were lower than those of the work around it: a labeler could tell
the check from ordinary work and take care only there. A labeler now sees no
task or prompt id, and outputs under ids new for every assignment.
"""

from __future__ import annotations

import re

from sqlalchemy import select

from app.models import Assignment, Completion, Ranking
from app.quality import gold
from app.security import create_api_token
from tests.factories import UserFactory
from tests.test_gold import seeded_draw  # noqa: F401  the fixture
from tests.test_labeling import seed_batch, tasks_of
from tests.test_quality import rank


def gold_batch(db):
    batch = seed_batch(db, n_prompts=3, k=4)
    first, *_ = tasks_of(db, batch)
    gold.mark_ranking_gold(db, rank(db, UserFactory(), first, [1, 2, 3, 4]).id, None, batch.id)
    batch.gold_share = 1.0
    return batch, first


def test_a_gold_check_through_the_api_carries_no_telling_id(client, db, seeded_draw):  # noqa: F811
    _, first = gold_batch(db)
    token, _ = create_api_token(db, UserFactory(), ["label"])
    db.commit()
    auth = {"authorization": f"Bearer {token}"}
    body = client.get("/api/v1/tasks/next?kind=ranking", headers=auth).json()
    assert db.get(Assignment, body["assignment_id"]).task_id == first.id  # the check was served
    assert "task_id" not in body and "prompt_id" not in body
    real = set(db.scalars(select(Completion.id)))
    shown = [c["id"] for c in body["completions"]]
    assert len(shown) == 4 and not set(shown) & real
    url = f"/api/v1/assignments/{body['assignment_id']}/submit"
    # The outputs' real ids are not accepted: only what this assignment shows.
    by_real = [{"completion_id": cid, "rank": 1, "likert": 4} for cid in sorted(real)[:4]]
    refused = client.post(url, headers=auth, json={"items": by_real})
    assert refused.status_code == 422 and refused.json()["field"] == "items[0].completion_id"
    assert str(sorted(real)[0]) in refused.json()["detail"]
    items = [{"completion_id": cid, "rank": n + 1, "likert": 4} for n, cid in enumerate(shown)]
    done = client.post(url, headers=auth, json={"items": items})
    assert done.status_code == 200 and [i["completion_id"] for i in done.json()["items"]] == shown
    db.expire_all()
    check = db.scalar(select(Ranking).where(Ranking.assignment_id == body["assignment_id"]))
    assert check.is_gold and check.task_id == first.id


def test_the_ranking_page_shows_no_task_or_completion_id(client, db, login, seeded_draw):  # noqa: F811
    _, first = gold_batch(db)
    labeler = UserFactory()
    db.commit()
    login(labeler.username)
    page = client.get("/label/next?kind=ranking")
    assert 'data-testid="ranking-page"' in page.text
    assignment = db.scalar(select(Assignment).where(Assignment.labeler_id == labeler.id))
    assert assignment.task_id == first.id
    assert f"task {first.id}" not in page.text
    shown = set(re.findall(r'data-completion-id="(\d+)"', page.text))
    assert len(shown) == 4 and not shown & {str(cid) for cid in assignment.display_order}
