"""Training you can trust: runs refuse what cannot work, and a failed run says why in words.

Starting an SFT, RM, DPO or PPO run by hand (the API and the runs form both) answers 409 naming `kind`
with what to do first, and queues nothing; the data is made the way the product makes it. A failed
run's page shows its reason; the traceback stays folded away in a details element, for admins only.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select

from app.models import Task, TrainingRun, utcnow
from tests.factories import ModelVersionFactory, UserFactory
from tests.html_text import text
from tests.test_quality import rank
from tests.test_training_data import collect, demonstrate_all


def ready_to_train(db, *, demonstrate: bool = True, ranks: list[int] | None = (1, 2, 3, 4)) -> dict:
    """A promoted base model and a sampled batch whose prompts one labeler demonstrated and ranked."""
    made = collect(db, per_user=1)
    label(db, made["batch"], demonstrate=demonstrate, ranks=ranks)
    return made


def ready_for_every_run(db) -> None:
    """What SFT, RM, DPO and PPO start from: demonstrations and rankings, and an SFT and a reward model."""
    ready_to_train(db)
    ModelVersionFactory(kind="sft")
    ModelVersionFactory(kind="rm")


def label(db, batch, *, demonstrate: bool = True, ranks: list[int] | None = (1, 2, 3, 4)) -> None:
    """A new labeler demonstrates and ranks every task of the batch (each task takes two labelers)."""
    labeler = UserFactory()
    if demonstrate:
        demonstrate_all(db, labeler, batch)
    if ranks is not None:
        tasks = db.scalars(
            select(Task)
            .where(Task.batch_id == batch.id, Task.kind == "ranking", Task.is_gold.is_(False))
            .order_by(Task.id)
        )
        for task in tasks:
            rank(db, labeler, task, list(ranks))


def runs_queued(db) -> int:
    """The training runs queued (starting a batch queues its sampling run, which is not one of them)."""
    kinds = ("sft", "rm", "dpo", "ppo")
    return db.scalar(select(func.count()).select_from(TrainingRun).where(TrainingRun.kind.in_(kinds)))


def refused(response, *says: str) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    assert (body["field"], body["code"]) == ("kind", "conflict"), body
    for part in says:
        assert part in body["detail"], body["detail"]


def test_api_refuses_runs_with_nothing_to_start_from(client, db, auth):
    def start(kind):
        return client.post("/api/v1/runs", json={"kind": kind}, headers=auth)

    refused(start("sft"), "SFT needs a base model", "register one first")
    refused(start("rm"), "needs an SFT or base model")
    refused(start("dpo"), "DPO needs an SFT or base model")
    refused(start("ppo"), "train an SFT model and a reward model first")
    assert runs_queued(db) == 0

    ModelVersionFactory(kind="base", status="promoted")
    refused(start("sft"), "SFT needs demonstrations in the train split: label some first (0 so far)")
    refused(start("rm"), "rankings in the train split", "(0 so far")
    refused(start("dpo"), "rankings in the train split")
    ModelVersionFactory(kind="sft")
    refused(start("ppo"), "train a reward model first")
    assert runs_queued(db) == 0


def test_api_refuses_rankings_that_are_all_ties_and_starts_once_there_is_data(client, db, auth):
    made = ready_to_train(db, demonstrate=False, ranks=[1, 1, 1, 1])
    refused(client.post("/api/v1/runs", json={"kind": "rm"}, headers=auth), "(0 so far, of 1 rankings)")
    refused(client.post("/api/v1/runs", json={"kind": "sft"}, headers=auth), "(0 so far)")
    assert runs_queued(db) == 0

    label(db, made["batch"])
    for kind in ("sft", "rm", "dpo"):
        started = client.post("/api/v1/runs", json={"kind": kind}, headers=auth)
        assert started.status_code == 201, started.text
    ModelVersionFactory(kind="sft")
    ModelVersionFactory(kind="rm")
    assert client.post("/api/v1/runs", json={"kind": "ppo"}, headers=auth).status_code == 201
    assert runs_queued(db) == 4


def test_runs_form_says_what_to_do_first(client, db, admin, login):
    csrf = login(admin.username)
    ModelVersionFactory(kind="base", status="promoted")
    response = client.post("/admin/runs", data={"csrf_token": csrf, "kind": "sft", "params": '{"epochs": 2}'})
    assert response.status_code == 409
    assert "SFT needs demonstrations in the train split: label some first (0 so far)" in response.text
    assert "&#34;epochs&#34;: 2" in response.text  # the form keeps what was typed
    assert runs_queued(db) == 0


TRACEBACK = """Traceback (most recent call last):
  File "/srv/worker/jobs.py", line 290, in run_sft
    raise RuntimeError("no demonstrations in the train split yet")
RuntimeError: no demonstrations in the train split yet"""


def test_a_failed_runs_page_says_why_and_folds_the_traceback_away(client, db, admin, login):
    run = TrainingRun(
        kind="sft",
        status="failed",
        error="RuntimeError: no demonstrations in the train split yet",
        traceback=TRACEBACK,
        finished_at=utcnow(),
    )
    db.add(run)
    db.flush()
    labeler = UserFactory()
    login(labeler.username)
    assert client.get(f"/admin/runs/{run.id}", follow_redirects=False).status_code == 403  # admins only
    login(admin.username)
    page = client.get(f"/admin/runs/{run.id}").text
    assert text(page, "run-reason") == "No demonstrations in the train split yet."
    # The traceback is there for an admin who asks, inside a details element that starts closed.
    details = re.search(r"<details([^>]*)>(.*?)</details>", page, re.S)
    assert details is not None and 'data-testid="run-traceback-details"' in details.group(1), page
    assert " open" not in details.group(1)
    assert "<summary>" in details.group(2) and "File &#34;/srv/worker/jobs.py&#34;, line 290" in details.group(2)
    outside = page.replace(details.group(0), "")
    assert "Traceback (most recent call last)" not in outside and "/srv/worker/jobs.py" not in outside
