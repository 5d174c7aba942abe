"""Finding 2: blind evaluation was not blind.

The output ids on the comparison page and in the API were completion ids,
and model A's outputs are sampled first: the lower id was model A in 8 of 8
tries. A judge now sees opaque ids of one length, different for every
assignment, on a side drawn at random and recorded on the server.
"""

from __future__ import annotations

import re

from sqlalchemy import select

from app.labeling import leases
from app.models import Assignment, Completion, EvalJudgment, Task
from app.quality import evaluations
from app.security import create_api_token
from tests.factories import UserFactory
from tests.test_evaluations import held_out_batch, sample_by_hand, two_models


def start(db, n: int = 4, overlap: int = 2):
    held_out_batch(db, n=n)
    a, b = two_models(db)
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=n, overlap=overlap)
    sample_by_hand(db, evaluation)
    return evaluation, a, b


def all_completion_ids(db) -> set[int]:
    return set(db.scalars(select(Completion.id)))


def test_the_api_shows_opaque_ids_that_differ_per_judge(client, db):
    _, a, _b = start(db)
    tokens = [create_api_token(db, UserFactory(), ["label"])[0] for _ in range(2)]
    db.commit()
    real = all_completion_ids(db)
    seen: list[dict] = []
    for token in tokens:
        auth = {"authorization": f"Bearer {token}"}
        task = client.get("/api/v1/tasks/next?kind=eval", headers=auth).json()
        ids = [c["id"] for c in task["completions"]]
        assert len(ids) == 2 and not set(ids) & real, ids  # nothing a judge can sort by sampling order
        assert len({len(str(i)) for i in ids}) == 1  # nor tell apart by length
        assert "task_id" not in task and "prompt_id" not in task
        seen.append(task)
    first, second = seen
    tasks = {db.get(Assignment, t["assignment_id"]).task_id for t in seen}
    if len(tasks) == 1:
        # The same two outputs: another judge sees other ids.
        assert not {c["id"] for c in first["completions"]} & {c["id"] for c in second["completions"]}

    # The judge answers with the id they saw; the server knows which model that was.
    auth = {"authorization": f"Bearer {tokens[0]}"}
    chosen = first["completions"][1]
    done = client.post(
        f"/api/v1/assignments/{first['assignment_id']}/submit", headers=auth, json={"choice": chosen["id"]}
    )
    assert done.status_code == 200 and done.json()["choice"] == chosen["id"]
    db.expire_all()
    judgment = db.scalar(select(EvalJudgment).where(EvalJudgment.assignment_id == first["assignment_id"]))
    written_by = db.scalar(select(Completion.model_version_id).where(Completion.text == chosen["text"]))
    assert judgment.winner == ("a" if written_by == a.id else "b")
    assert judgment.chosen_completion_id is not None and done.json()["choice"] != judgment.chosen_completion_id
    # Another assignment's ids are not accepted here.
    other = client.post(
        f"/api/v1/assignments/{second['assignment_id']}/submit",
        headers={"authorization": f"Bearer {tokens[1]}"},
        json={"choice": chosen["id"]},
    )
    assert other.status_code == 422 and other.json()["field"] == "choice"


def test_the_comparison_page_shows_no_completion_id(client, db, login):
    start(db, n=1, overlap=1)
    labeler = UserFactory()
    db.commit()
    login(labeler.username)
    page = client.get("/label/next?kind=eval")
    assert 'data-testid="eval-page"' in page.text
    values = re.findall(r'name="choice" value="([^"]+)"', page.text)
    assert len(values) == 3 and values[2] == "tie"
    real = {str(cid) for cid in all_completion_ids(db)}
    assert not set(values) & real
    assert len({len(v) for v in values[:2]}) == 1
    page_data = re.search(r'"completion_ids":\s*\[([^\]]*)\]', page.text).group(1)
    assert {v.strip() for v in page_data.split(",")} == set(values[:2])


def test_the_side_is_random_per_judge_and_recorded(db):
    evaluation, a, _b = start(db, n=1, overlap=20)
    firsts = []
    for _ in range(20):
        assignment = leases.lease_next_task(db, UserFactory(), "eval")
        first = db.get(Completion, assignment.display_order[0])
        firsts.append(first.model_version_id == a.id)
        assert db.get(Task, assignment.task_id).batch_id == evaluation.batch_id
    # Drawn per judge: with 20 judges both sides come first (all on one side: odds 2 in 2**20).
    assert 0 < sum(firsts) < 20
