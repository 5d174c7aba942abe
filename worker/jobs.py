"""The bodies of the GPU jobs: read what to do from the database, do it with torch, record the result.

Each body takes a run id and a reporter and returns (metrics, model version
id). Database work happens in short transactions between the heavy steps,
so a crash leaves only whole chunks behind, and a re-run picks up where the
last one stopped (sampling skips prompts that already have K outputs;
trainers resume from their checkpoint directory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.config import get_settings
from app.db import session_scope
from app.models import ModelVersion, PromptBatch, TrainingRun
from app.services import registry
from app.services.sampling import open_for_labeling, prompts_needing_samples, store_samples

log = logging.getLogger(__name__)

SAMPLE_CHUNK = 32  # prompts per transaction: small enough to lose little on a crash


def run_dir(run_id: int) -> Path:
    """Returns the working directory of a run (checkpoints, temporary artifacts)."""
    path = get_settings().artifacts_dir / "runs" / str(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_sampling(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Samples K outputs for every prompt of the run's batch that lacks them, then opens labeling."""
    from worker.generate import sample_completions
    from worker.modeling import load_model

    with session_scope() as db:
        run = db.get(TrainingRun, run_id)
        batch = db.get(PromptBatch, run.batch_id)
        policy = registry.sampling_policy(db, batch.policy_version_id)
        if policy is None:
            raise RuntimeError("no model version to sample from; register a base model first")
        todo = prompts_needing_samples(db, batch, policy.id)
        settings = {"temperature": batch.temperature, "top_p": batch.top_p, "max_new_tokens": batch.max_new_tokens}
        k, batch_id, policy_id, artifact = batch.k, batch.id, policy.id, policy.artifact_path
    report(0.0, f"loading {artifact}", force=True)
    model, tokenizer = load_model(artifact)
    done = 0
    for start in range(0, len(todo), SAMPLE_CHUNK):
        chunk = todo[start:start + SAMPLE_CHUNK]
        outputs = sample_completions(model, tokenizer, [text for _, text in chunk], k, **settings)
        with session_scope() as db:
            store_samples(db, policy_id, {pid: texts for (pid, _), texts in zip(chunk, outputs)},
                          settings | {"model_version_id": policy_id})
        done += len(chunk)
        report(done / max(1, len(todo)), f"sampled {done}/{len(todo)} prompts", force=True)
    with session_scope() as db:
        batch = db.get(PromptBatch, batch_id)
        tasks = open_for_labeling(db, batch)
    return {"prompts_sampled": done, "k": k, "tasks_created": tasks, "model_version_id": policy_id}, None


def run_pretrain(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Pretrains the bundled world's base model into the artifacts dir and registers it."""
    from worker.world_model import pretrain_base

    with session_scope() as db:
        params = db.get(TrainingRun, run_id).params
    out = get_settings().artifacts_dir / "models" / f"world-base-run{run_id}"
    report(0.0, "pretraining the world base model", force=True)
    kwargs = {"steps": int(params["steps"])} if params.get("steps") else {}
    metrics = pretrain_base(out, seed=int(params.get("seed", 0)), progress=False, **kwargs)
    with session_scope() as db:
        version = registry.register_base_model(db, str(out), metrics=metrics)
        version.training_run_id = run_id
        return metrics, version.id


def version_artifact(version_id: int) -> str:
    """Returns where a model version's files are."""
    with session_scope() as db:
        return db.get(ModelVersion, version_id).artifact_path
