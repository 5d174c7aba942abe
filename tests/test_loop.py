"""The whole loop through real processes: import → sample → label → train SFT, RM, PPO → resample.

Simulated labelers from the bundled world stand in for people; the Celery
worker samples from the bundled base model, trains the three models with
small settings, and the next batch is sampled from the new policy.
"""

from __future__ import annotations

import json
import random

import pytest
from sqlalchemy import func, select

from app.models import Completion, ModelVersion, Prompt, PromptBatch, TrainingRun, User
from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the seeded loop trains every stage


def _wait_run(db, run_id: int, timeout: float = 300) -> TrainingRun:
    def finished():
        db.expire_all()
        run = db.get(TrainingRun, run_id)
        return run if run.status in ("succeeded", "failed") else None

    run = wait_until(finished, timeout=timeout, interval=0.5, message=f"run {run_id}")
    assert run.status == "succeeded", f"{run.kind} failed: {run.error}\n{run.traceback}"
    return run


def _new_batch(db, name: str, n: int, seed: int) -> PromptBatch:
    from app.collection.batches import create_batch, import_prompts, start_batch
    from app.world import generate_prompts

    batch = create_batch(db, name=name, k=4, overlap=1, max_new_tokens=16, temperature=1.0, top_p=1.0)
    lines = [
        json.dumps({"text": p.text, "source_user_id": f"u{i % 10}"})
        for i, p in enumerate(generate_prompts(n, seed=seed))
    ]
    outcome = import_prompts(db, batch, "\n".join(lines).encode(), "jsonl")
    assert outcome.ok and outcome.stored > 0
    start_batch(db, batch)
    db.commit()
    return batch


def test_import_sample_label_train_resample(committed_session, celery_worker):
    from app.collection.batches import sampling_policy
    from app.labeling import leases, submissions
    from app.registry.versions import register_base_model
    from app.runs import start_run
    from app.security import hash_password
    from app.world import SimulatedDemonstrator, SimulatedLabeler

    db = committed_session
    register_base_model(db, str(ROOT / "models" / "world-base"))
    labelers = [User(username=f"sim{i}", role="labeler", password_hash=hash_password("x" * 12)) for i in range(2)]
    db.add_all(labelers)
    db.commit()

    batch = _new_batch(db, "loop-1", 40, seed=11)
    sample_run = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch.id))
    _wait_run(db, sample_run.id)

    rng = random.Random(0)
    demonstrator = SimulatedDemonstrator(error_rate=0.2, seed=1)
    judges = {u.id: SimulatedLabeler(seed=u.id) for u in labelers}
    submitted = {"demonstration": 0, "ranking": 0}
    for user in labelers:
        while (assignment := leases.lease_next_task(db, user)) is not None:
            view = leases.task_view(db, assignment)
            if view.task.kind == "demonstration":
                submissions.submit_demonstration(
                    db,
                    user,
                    assignment.id,
                    demonstrator.demonstrate(view.prompt.text),
                    active_seconds=rng.uniform(10, 60),
                )
            else:
                texts = [c.text for c in view.completions]
                ranks = judges[user.id].rank(view.prompt.text, texts)
                likert = judges[user.id].likert(view.prompt.text, texts)
                items = [
                    {"completion_id": c.id, "rank": r, "likert": s, "flags": []}
                    for c, r, s in zip(view.completions, ranks, likert, strict=True)
                ]
                submissions.submit_ranking(db, user, assignment.id, items, active_seconds=rng.uniform(10, 60))
            submitted[view.task.kind] += 1
            db.commit()
    assert submitted == {"demonstration": 40, "ranking": 40}  # overlap 1: each task labeled exactly once

    small = {
        "epochs": 1,
        "batch_size": 8,
        "rankings_per_step": 4,
        "rankings_per_micro_batch": 4,
        "steps": 2,
        "rollout_batch_size": 4,
        "minibatch_size": 4,
        "micro_batch_size": 4,
        "ppo_epochs": 1,
        "max_new_tokens": 8,
        "eval_size": 4,
    }
    versions = {}
    for kind in ("sft", "rm", "ppo"):
        run = start_run(db, kind, params=small)
        db.commit()
        run = _wait_run(db, run.id)
        versions[kind] = db.get(ModelVersion, run.output_version_id)
        assert versions[kind].status in ("ready", "promoted") and versions[kind].metrics
    assert versions["rm"].parent_id == versions["sft"].id
    assert versions["ppo"].lineage == {"sft": versions["sft"].id, "rm": versions["rm"].id}
    assert sampling_policy(db).id == versions["ppo"].id

    batch2 = _new_batch(db, "loop-2", 6, seed=99)
    run2 = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch2.id))
    _wait_run(db, run2.id)
    sampled_by = db.scalars(
        select(func.distinct(Completion.model_version_id))
        .join(Prompt, Prompt.id == Completion.prompt_id)
        .where(Prompt.batch_id == batch2.id)
    ).all()
    assert sampled_by == [versions["ppo"].id]  # the next batch comes from the new policy
