"""Many labelers at once on PostgreSQL: 32 threads lease and submit rankings at the same moment, through the
service with their own sessions and through the HTTP API of a real server, and every task ends with exactly
`overlap` labels: no slot handed out twice, no submission lost or doubled."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from app.db import get_sessionmaker
from app.labeling import leases, submissions
from app.models import Assignment, Ranking, RankingItem, Task, User
from app.security import create_api_token
from tests.test_labeling import seed_batch

pytestmark = pytest.mark.slow

THREADS = 32
PROMPTS = 12
OVERLAP = 3
K = 4


def seed(with_tokens: bool) -> tuple[list[int], list[str]]:
    """Commits a batch of PROMPTS ranking tasks needing OVERLAP labels each, and THREADS labelers."""
    with get_sessionmaker()() as db:
        seed_batch(db, n_prompts=PROMPTS, k=K, overlap=OVERLAP)
        users = [User(username=f"crowd{i}", role="labeler", password_hash="!") for i in range(THREADS)]
        db.add_all(users)
        db.flush()
        tokens = [create_api_token(db, user, ["label"])[0] for user in users] if with_tokens else []
        db.commit()
        return [user.id for user in users], tokens


def items(order: list[int], labeler_index: int) -> list[dict]:
    # Each labeler ranks differently (and with a tie) so rankings are not all alike.
    slots = [1 + (labeler_index + i) % (K - 1) for i in range(len(order))]
    return [{"completion_id": cid, "rank": slot, "likert": slot + 1} for cid, slot in zip(order, slots, strict=True)]


def check_the_books(submitted: list[tuple[int, int, int]]) -> None:
    """Asserts the database holds exactly the submissions the clients saw succeed, OVERLAP per task.

    `submitted`: (ranking id, assignment id, labeler id) as each client saw it acknowledged.
    """
    with get_sessionmaker()() as db:
        acknowledged = db.execute(select(Ranking.id, Ranking.assignment_id, Ranking.labeler_id)).all()
        assert sorted(tuple(r) for r in acknowledged) == sorted(submitted)
        rankings = db.execute(select(Ranking.id, Ranking.task_id, Ranking.labeler_id)).all()
        assert len(rankings) == PROMPTS * OVERLAP
        per_task = Counter(task_id for _, task_id, _ in rankings)
        assert set(per_task.values()) == {OVERLAP} and len(per_task) == PROMPTS
        assert len({(task_id, labeler) for _, task_id, labeler in rankings}) == len(rankings)
        tasks = db.execute(select(Task.done_count, Task.needed, Task.is_open)).all()
        assert all(done == needed == OVERLAP and not is_open for done, needed, is_open in tasks)
        assert db.scalar(select(func.count()).select_from(RankingItem)) == len(rankings) * K
        states = Counter(db.scalars(select(Assignment.state)))
        assert states == {"submitted": PROMPTS * OVERLAP}  # every lease handed out ended in a submission


def run_crowd(work) -> list:
    """Runs `work(i)` in THREADS threads released together; returns their results, raising the first error."""
    start = threading.Barrier(THREADS)

    def go(i):
        start.wait()
        return work(i)

    with ThreadPoolExecutor(THREADS) as pool:
        return [future.result() for future in [pool.submit(go, i) for i in range(THREADS)]]


def test_32_labelers_through_the_service_never_share_a_slot(committed):
    user_ids, _ = seed(with_tokens=False)

    def work(i: int) -> list[tuple[int, int, int]]:
        done = []
        with get_sessionmaker()() as db:
            labeler = db.get(User, user_ids[i])
            while True:
                assignment = leases.lease_next_task(db, labeler, "ranking")
                db.commit()
                if assignment is None:
                    return done
                ranking = submissions.submit_ranking(
                    db, labeler, assignment.id, items(assignment.display_order, i), active_seconds=3
                )
                db.commit()
                done.append((ranking.id, ranking.assignment_id, labeler.id))

    results = run_crowd(work)
    check_the_books([row for rows in results for row in rows])


def test_32_labelers_through_the_http_api_never_share_a_slot(committed, live_server):
    user_ids, tokens = seed(with_tokens=True)

    def work(i: int) -> list[tuple[int, int, int]]:
        done = []
        headers = {"Authorization": f"Bearer {tokens[i]}"}
        with httpx.Client(base_url=live_server, headers=headers, timeout=60) as client:
            while True:
                response = client.get("/api/v1/tasks/next", params={"kind": "ranking"})
                if response.status_code == 204:
                    return done
                assert response.status_code == 200, response.text
                task = response.json()
                body = {"items": items([c["id"] for c in task["completions"]], i), "active_seconds": 3}
                url = f"/api/v1/assignments/{task['assignment_id']}/submit"
                # A double click: the same submit twice at once must store one ranking and answer both alike.
                with ThreadPoolExecutor(2) as pair:
                    answers = list(pair.map(lambda _, url=url, body=body: client.post(url, json=body), range(2)))
                assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
                assert answers[0].json()["id"] == answers[1].json()["id"]
                done.append((answers[0].json()["id"], task["assignment_id"], user_ids[i]))

    results = run_crowd(work)
    check_the_books([row for rows in results for row in rows])
