"""The bodies of the GPU jobs: read what to do from the database, do it with torch, record the result.

Each body takes a run id and a reporter and returns (metrics, model version
id). Database work happens in short transactions between the heavy steps,
so a crash leaves only whole chunks behind, and a re-run picks up where the
last one stopped (sampling skips prompts that already have K outputs;
trainers resume from their checkpoint directory).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.collection import batches
from app.collection.sampling import open_for_labeling, prompts_needing_samples, store_samples
from app.config import get_settings
from app.db import session_scope
from app.models import Evaluation, ModelVersion, PromptBatch, TrainingRun
from app.quality import evaluations
from app.registry import versions as registry
from app.training import data as training
from app.training.configs import PPOConfig, config_for

log = logging.getLogger(__name__)

SAMPLE_CHUNK = 32  # prompts per transaction: small enough to lose little on a crash

_Row = TypeVar("_Row")


def run_dir(run_id: int) -> Path:
    """Returns the working directory of a run (checkpoints, temporary artifacts)."""
    path = get_settings().artifacts_dir / "runs" / str(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch(db: Session, model: type[_Row], ident: int | None) -> _Row:
    """Loads a row a run refers to, or fails the run naming what is missing."""
    # The run was queued with these ids, so a miss means the row was deleted since: the run cannot go on.
    row = db.get(model, ident) if ident is not None else None
    if row is None:
        raise LookupError(f"{model.__name__} {ident} not found")
    return row


def run_sampling(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Samples K outputs for every prompt of the run's batch that lacks them, then opens labeling."""
    from worker.generate import sample_completions
    from worker.modeling import load_model

    with session_scope() as db:
        run = _fetch(db, TrainingRun, run_id)
        batch = _fetch(db, PromptBatch, run.batch_id)
        if batch.purpose == "evaluation":
            return run_eval_sampling(run_id, report)
        policy = batches.sampling_policy(db, batch.policy_version_id)
        if policy is None:
            raise RuntimeError("no model version to sample from; register a base model first")
        todo = prompts_needing_samples(db, batch, policy.id)
        settings: dict[str, Any] = {
            "temperature": batch.temperature,
            "top_p": batch.top_p,
            "max_new_tokens": batch.max_new_tokens,
        }
        k, batch_id, policy_id, artifact = batch.k, batch.id, policy.id, policy.artifact_path
    report(0.0, f"loading {artifact}", force=True)
    model, tokenizer = load_model(artifact)
    done = 0
    for start in range(0, len(todo), SAMPLE_CHUNK):
        chunk = todo[start : start + SAMPLE_CHUNK]
        outputs = sample_completions(model, tokenizer, [messages for _, messages in chunk], k, **settings)
        with session_scope() as db:
            store_samples(
                db,
                policy_id,
                {pid: texts for (pid, _), texts in zip(chunk, outputs, strict=True)},
                settings | {"model_version_id": policy_id},
            )
        done += len(chunk)
        report(done / max(1, len(todo)), f"sampled {done}/{len(todo)} prompts", force=True)
    with session_scope() as db:
        batch = _fetch(db, PromptBatch, batch_id)
        tasks = open_for_labeling(db, batch)
    return {"prompts_sampled": done, "k": k, "tasks_created": tasks, "model_version_id": policy_id}, None


def run_eval_sampling(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Samples one output per prompt from each of an evaluation's two models, then opens the blind comparison."""
    from worker.generate import sample_completions
    from worker.modeling import load_model

    with session_scope() as db:
        batch_id = _fetch(db, TrainingRun, run_id).batch_id
        evaluation = evaluations.for_batch(db, batch_id) if batch_id is not None else None
        if evaluation is None:
            raise LookupError(f"no evaluation for batch {batch_id}")
        models = [
            (v.id, v.artifact_path)
            for v in (_fetch(db, ModelVersion, evaluation.model_a_id), _fetch(db, ModelVersion, evaluation.model_b_id))
        ]
        settings: dict[str, Any] = {
            "temperature": evaluation.temperature,
            "top_p": 1.0,
            "max_new_tokens": evaluation.max_new_tokens,
        }
        evaluation_id = evaluation.id
    sampled = 0
    for index, (model_id, artifact) in enumerate(models):
        with session_scope() as db:
            todo = evaluations.prompts_needing_output(db, _fetch(db, Evaluation, evaluation_id), model_id)
        report(index / 2, f"loading {artifact}", force=True)
        model, tokenizer = load_model(artifact)
        for start in range(0, len(todo), SAMPLE_CHUNK):
            chunk = todo[start : start + SAMPLE_CHUNK]
            outputs = sample_completions(model, tokenizer, [messages for _, messages in chunk], 1, **settings)
            with session_scope() as db:
                store_samples(
                    db,
                    model_id,
                    {pid: texts for (pid, _), texts in zip(chunk, outputs, strict=True)},
                    settings | {"model_version_id": model_id, "evaluation_id": evaluation_id},
                )
            sampled += len(chunk)
            report(
                (index + (start + len(chunk)) / max(1, len(todo))) / 2,
                f"model {index + 1}/2: sampled {start + len(chunk)}/{len(todo)} prompts",
                force=True,
            )
        del model
    with session_scope() as db:
        evaluation = _fetch(db, Evaluation, evaluation_id)
        tasks = evaluations.open_for_judging(db, evaluation)
        identical = evaluation.n_identical
    return {
        "evaluation_id": evaluation_id,
        "outputs_sampled": sampled,
        "tasks_created": tasks,
        "identical_pairs": identical,
    }, None


def run_pretrain(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Pretrains the bundled world's base model into the artifacts dir and registers it."""
    from worker.world_model import pretrain_base

    config = config_for("pretrain", _params(run_id))
    out = get_settings().artifacts_dir / "models" / f"world-base-run{run_id}"
    report(0.0, "pretraining the world base model", force=True)
    kwargs = {"steps": config.steps} if config.steps is not None else {}
    metrics = pretrain_base(out, seed=config.seed, progress=False, **kwargs)
    with session_scope() as db:
        version = registry.register_base_model(db, str(out), metrics=metrics)
        version.training_run_id = run_id
        return metrics, version.id


def run_validate(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Validates a registered model and stores its facts; the version becomes ready when the run succeeds."""
    from worker.validate import validate_model

    with session_scope() as db:
        version = _fetch(db, ModelVersion, int(_params(run_id).get("version_id") or 0))
        version_id, source, kind, revision = (
            version.id,
            version.source or version.artifact_path,
            version.kind,
            version.revision,
        )
    report(0.1, f"loading {source}", force=True)
    # A hub model is saved where every worker reads artifacts, so the revision validated is the one sampled
    # and trained, whatever the hub's branch points to later; a local folder is used where it lies.
    pinned = get_settings().artifacts_dir / "models" / f"{kind}-registered-{version_id}"
    facts = validate_model(source, kind, revision, pin_to=pinned)
    with session_scope() as db:
        registry.record_facts(db, version_id, facts, str(pinned) if facts.get("pinned") else None)
    return {"parameters": facts["parameters"]}, version_id


def version_artifact(version_id: int) -> str:
    """Returns where a model version's files are."""
    with session_scope() as db:
        return _fetch(db, ModelVersion, version_id).artifact_path


# --- training ---------------------------------------------------------------------------------


def _progress(report, start: float = 0.0, span: float = 0.95):
    """Adapts a trainer's (step, total, metrics) callback to the run reporter; keeps a loss curve."""
    curve: list[dict[str, Any]] = []

    def callback(step: int, total: int, metrics: dict[str, float]) -> None:
        curve.append({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        report(start + span * step / max(1, total), f"step {step}/{total}", {"curve": curve[-200:]})

    return callback


def _begin_version(
    run_id: int, kind: str, parent_id: int | None, lineage: dict[str, Any], snapshot: dict[str, Any]
) -> tuple[int, Path]:
    """Registers the model a run is producing (status `training`) and returns its id and final path."""
    out = get_settings().artifacts_dir / "models" / f"{kind}-run{run_id}"
    with session_scope() as db:
        name = f"{kind}-run{run_id}"
        existing = db.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if existing is not None:  # a resumed run reuses its version row
            return existing.id, out
        version = registry.register_version(
            db,
            kind=kind,
            name=name,
            artifact_path=str(out),
            status="training",
            parent_id=parent_id,
            lineage=lineage,
            data_snapshot=snapshot,
            training_run_id=run_id,
        )
        return version.id, out


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _params(run_id: int) -> dict[str, Any]:
    with session_scope() as db:
        return dict(_fetch(db, TrainingRun, run_id).params or {})


def _with_recipe(db: Session, start: ModelVersion, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """A run's params over the recipe shipped with the base model its starting version descends from.

    The config dataclasses' defaults suit models of InstructGPT's size; a base model can carry the
    settings measured for it (models/world-base does), and a run's own params still win.
    """
    from worker.modeling import load_recipe

    base = registry.base_of(db, start)
    recipe = load_recipe(base.artifact_path).get(kind, {}) if base is not None else {}
    return {**recipe, **params}


def _fit_context(config: Any, model_path: str) -> None:
    """Caps a trainer's lengths at the context window of the model it starts from.

    A registered model may have fewer positions than the defaults (max_length 1024, PPO's 512-token prompts);
    past them its position embedding fails on the first long example. The recorded config shows the cap.
    """
    from worker.modeling import saved_context_length

    limit = saved_context_length(model_path)
    if limit is None:
        return
    if isinstance(config, PPOConfig):
        if config.max_new_tokens >= limit:
            raise ValueError(
                f"max_new_tokens ({config.max_new_tokens}) leaves no room for a prompt in the model's context "
                f"of {limit} tokens"
            )
        config.max_prompt_length = min(config.max_prompt_length, limit - config.max_new_tokens)
    else:
        config.max_length = min(config.max_length, limit)


def run_sft(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Fine-tunes the newest base model on the demonstrations collected so far."""
    from worker.train_sft import train_sft

    params = _params(run_id)
    with session_scope() as db:
        base = registry.promoted(db, "base") or training.latest(db, "base")
        if base is None:
            raise RuntimeError("no base model registered")
        data, snap = training.demonstrations(db)
        params = _with_recipe(db, base, "sft", params)
        base_id, base_path = base.id, base.artifact_path
    config = config_for("sft", params)
    if not data["train"]:
        raise RuntimeError("no demonstrations in the train split yet")
    _fit_context(config, base_path)
    version_id, out = _begin_version(run_id, "sft", base_id, {"base": base_id}, snap.as_dict())
    metrics = train_sft(
        base_path,
        data["train"],
        data["valid"],
        config,
        out,
        checkpoint_dir=run_dir(run_id) / "checkpoint",
        progress=_progress(report),
    )
    return _jsonable({**metrics, "config": asdict(config)}), version_id


def _ranking_examples(rows: list[Any]) -> list[Any]:
    """The trainers' RankingExamples from training.rankings() rows (the reward model's and DPO's data)."""
    from worker.train_rm import RankingExample

    return [RankingExample(r.prompt, r.completions, r.ranks, r.labeler) for r in rows]


def run_rm(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Trains a reward model on the rankings, from the newest SFT model (else the base)."""
    from worker.train_rm import train_rm

    params = _params(run_id)
    with session_scope() as db:
        backbone = training.latest(db, "sft") or registry.promoted(db, "base") or training.latest(db, "base")
        if backbone is None:
            raise RuntimeError("no SFT or base model to start the reward model from")
        data, snap = training.rankings(db)
        demos, _ = training.demonstrations(db)
        params = _with_recipe(db, backbone, "rm", params)
        backbone_id, backbone_path = backbone.id, backbone.artifact_path

    config = config_for("rm", params)
    if not data["train"]:
        raise RuntimeError("no rankings in the train split yet")
    _fit_context(config, backbone_path)
    version_id, out = _begin_version(run_id, "rm", backbone_id, {"backbone": backbone_id}, snap.as_dict())
    metrics = train_rm(
        backbone_path,
        _ranking_examples(data["train"]),
        _ranking_examples(data["valid"]),
        config,
        out,
        checkpoint_dir=run_dir(run_id) / "checkpoint",
        progress=_progress(report),
        demonstrations=demos["train"] or None,
    )
    return _jsonable({**metrics, "config": asdict(config)}), version_id


def run_dpo(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Trains the newest SFT model (else the base) on the rankings with DPO; the result is a policy version."""
    from worker.train_dpo import train_dpo

    params = _params(run_id)
    with session_scope() as db:
        start = training.latest(db, "sft") or registry.promoted(db, "base") or training.latest(db, "base")
        if start is None:
            raise RuntimeError("no SFT or base model to start DPO from")
        data, snap = training.rankings(db)
        params = _with_recipe(db, start, "dpo", params)
        start_id, start_path = start.id, start.artifact_path

    config = config_for("dpo", params)
    if not data["train"]:
        raise RuntimeError("no rankings in the train split yet")
    _fit_context(config, start_path)
    version_id, out = _begin_version(run_id, "policy", start_id, {"sft": start_id}, snap.as_dict())
    metrics = train_dpo(
        start_path,
        _ranking_examples(data["train"]),
        _ranking_examples(data["valid"]),
        config,
        out,
        checkpoint_dir=run_dir(run_id) / "checkpoint",
        progress=_progress(report),
    )
    return _jsonable({**metrics, "algorithm": "dpo", "config": asdict(config)}), version_id


def run_ppo(run_id: int, report) -> tuple[dict[str, Any], int | None]:
    """Optimises the SFT policy against the newest reward model with PPO (KL-penalised)."""
    from worker.train_ppo import train_ppo

    params = _params(run_id)
    with session_scope() as db:
        sft, rm = training.latest(db, "sft"), training.latest(db, "rm")
        if sft is None or rm is None:
            raise RuntimeError("PPO needs an SFT model and a reward model")
        prompts = training.prompts_for_ppo(db, "train")
        eval_prompts = training.prompts_for_ppo(db, "valid", limit=200)
        demos, _ = training.demonstrations(db)
        params = _with_recipe(db, sft, "ppo", params)
        sft_id, sft_path, rm_id, rm_path = sft.id, sft.artifact_path, rm.id, rm.artifact_path
    config = config_for("ppo", params)
    _fit_context(config, sft_path)
    version_id, out = _begin_version(
        run_id,
        "policy",
        sft_id,
        {"sft": sft_id, "rm": rm_id},
        {"counts": {"prompts": len(prompts)}},
    )
    metrics = train_ppo(
        sft_path,
        rm_path,
        prompts,
        config,
        out,
        ptx_examples=demos["train"] if getattr(config, "ptx_coef", 0) else None,
        checkpoint_dir=run_dir(run_id) / "checkpoint",
        progress=_progress(report),
        eval_prompts=eval_prompts or None,
    )
    return _jsonable({**metrics, "algorithm": "ppo", "config": asdict(config)}), version_id
