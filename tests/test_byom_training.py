"""Bring your own model, done (issue 16): a registered model goes through the whole production path with LoRA.

The tiny Llama of tests/test_model_registration.py (random weights, its own BPE tokenizer with a chat
template) is registered and promoted through the API and validated by a real worker; a batch is sampled
from it by the worker and labeled through the labeling service (train and valid prompts); SFT, RM and PPO
runs are started through the API with LoRA, the reward model saved as an adapter on the SFT model so PPO
keeps one frozen base; the SFT and PPO versions load with plain `AutoModelForCausalLM.from_pretrained`
(no peft), differ from their parents only in the modules peft put adapters on, and the PPO policy samples
the next batch. A model whose context is shorter than the trainers' default lengths (or than a prompt) has
them capped, instead of failing in its position embedding.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from app.models import Completion, Prompt, PromptBatch, TrainingRun
from tests.conftest import DATA_DIR, wait_until
from tests.factories import UserFactory, bind_factories
from tests.test_model_registration import _admin_headers, _settled, build_models
from tests.test_training_data import source_user_in

# peft's default LoRA targets for Llama (and Qwen2, Mistral).
ADAPTED = (".q_proj.", ".v_proj.")
SMALL = {"lora_r": 4, "learning_rate": 1e-3, "eval_batch_size": 4}


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, Path]:
    return build_models(DATA_DIR / "byom-models")  # built once per test run, shared with the registration tests


def _finished(client, headers, run_id: int, timeout: float = 300) -> dict:
    """Waits for a run through the API; fails with its error and traceback unless it succeeded."""
    run = wait_until(
        lambda: (
            (r := client.get(f"/api/v1/runs/{run_id}", headers=headers).json())["status"]
            in ("succeeded", "failed", "cancelled")
            and r
        ),
        timeout=timeout,
        interval=0.5,
        message=f"run {run_id}",
    )
    assert run["status"] == "succeeded", f"{run['kind']} run {run_id}: {run['error']}\n{run['traceback']}"
    return run


def _train(client, headers, kind: str, params: dict) -> tuple[dict, dict]:
    """Starts a run through the API, waits for it; returns the run and the model version it produced."""
    response = client.post("/api/v1/runs", json={"kind": kind, "params": params}, headers=headers)
    assert response.status_code == 201, response.text
    run = _finished(client, headers, response.json()["id"])
    assert run["output_version_id"] is not None
    version = client.get(f"/api/v1/models/{run['output_version_id']}", headers=headers).json()
    assert version["status"] in ("ready", "promoted") and version["training_run_id"] == run["id"], version
    return run, version


def _sampled_batch(db, name: str, texts: dict[str, list[str]], **fields) -> PromptBatch:
    """Imports prompts (by source user, so each lands in that user's split), starts the batch, waits for sampling."""
    from app.collection.batches import create_batch, import_prompts, start_batch

    batch = create_batch(db, name=name, k=4, overlap=1, temperature=1.0, top_p=1.0, max_new_tokens=8, **fields)
    lines = [json.dumps({"text": text, "source_user_id": user}) for user, rows in texts.items() for text in rows]
    outcome = import_prompts(db, batch, "\n".join(lines).encode(), "jsonl")
    assert outcome.ok and outcome.stored == len(lines), outcome.errors
    start_batch(db, batch)
    db.commit()
    run = wait_until(
        lambda: (
            (db.expire_all(), r := db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch.id)))[1]
            and r.status in ("succeeded", "failed")
            and r
        ),
        timeout=180,
        message=f"the sampling run of {name}",
    )
    assert run.status == "succeeded", f"{run.error}\n{run.traceback}"
    return batch


def _made_by(db, batch: PromptBatch) -> list[int]:
    db.expire_all()
    return list(
        db.scalars(
            select(Completion.model_version_id)
            .join(Prompt, Prompt.id == Completion.prompt_id)
            .where(Prompt.batch_id == batch.id)
        )
    )


def _label_everything(db, labeler) -> dict[str, int]:
    """The labeler writes a demonstration for, and ranks the outputs of, every prompt (output 1 best)."""
    from app.labeling import leases, submissions

    done = {"demonstration": 0, "ranking": 0}
    while (assignment := leases.lease_next_task(db, labeler)) is not None:
        view = leases.task_view(db, assignment)
        if view.task.kind == "demonstration":
            submissions.submit_demonstration(db, labeler, assignment.id, f"The answer is {done['demonstration']}.")
        else:
            items = [
                {"completion_id": c.id, "rank": rank, "likert": 5 - rank, "flags": []}
                for rank, c in enumerate(view.completions, start=1)
            ]
            submissions.submit_ranking(db, labeler, assignment.id, items)
        done[view.task.kind] += 1
        db.commit()
    return done


def _plain_weights(path: str):
    """Loads a version the way a user would, without peft; returns the loaded class name and its weights."""
    from transformers import AutoModelForCausalLM

    assert not (Path(path) / "adapter_config.json").exists(), f"{path} is a PEFT adapter, not a model"
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # A merged save with peft's names left in (`base_layer`, `lora_`) would load with these missing or unexpected.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    assert not [name for name in state if "lora_" in name or "base_layer" in name]
    return type(model).__name__, state


def _changed(before: dict, after: dict) -> set[str]:
    import torch

    assert set(before) == set(after)
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_registered_llama_is_sampled_labeled_and_trained_sft_rm_ppo_with_lora_and_its_policy_samples(
    committed_session, worker_client, celery_worker, tiny_models
):
    db = committed_session
    bind_factories(db)
    headers = _admin_headers(db)
    labeler = UserFactory()
    db.commit()

    # Register the model as the promoted base; a real worker validates it.
    response = worker_client.post(
        "/api/v1/models",
        json={"source": str(tiny_models["llama"]), "name": "team-llama", "promote": True},
        headers=headers,
    )
    assert response.status_code == 202, response.text
    base = _settled(worker_client, headers, response.json()["id"])
    assert base["status"] == "promoted", base["error"]
    assert base["facts"]["architecture"] == "LlamaForCausalLM" and base["facts"]["has_chat_template"]
    context = base["facts"]["context_length"]
    assert context == 96

    # Collect data on it: the worker samples K outputs per prompt from the promoted base; one labeler labels all.
    from app.world import generate_prompts

    tag = uuid.uuid4().hex[:8]
    prompts = [p.text for p in generate_prompts(9, seed=3)]
    collected = _sampled_batch(
        db,
        f"byom-collect-{tag}",
        {source_user_in("train", tag): prompts[:6], source_user_in("valid", tag): prompts[6:]},
        wants_demonstrations=True,
        wants_rankings=True,
    )
    assert _made_by(db, collected) == [base["id"]] * 9 * 4
    assert _label_everything(db, labeler) == {"demonstration": 9, "ranking": 9}

    # SFT from the registered base, with LoRA merged into the saved weights.
    sft_run, sft = _train(worker_client, headers, "sft", {**SMALL, "epochs": 1, "batch_size": 4, "micro_batch_size": 2})
    assert sft["parent_id"] == base["id"] and sft["metrics"]["saved_as"] == "merged"
    assert sft_run["metrics"]["steps"] >= 1 and sft_run["metrics"]["n_train"] == 6
    assert sft_run["metrics"]["n_valid"] == 3
    assert sft_run["metrics"]["config"]["max_length"] == context  # the default 1024 capped at the model's context

    # The reward model from the SFT model, saved as the adapter alone.
    rm_run, rm = _train(
        worker_client,
        headers,
        "rm",
        {**SMALL, "lora_save": "adapter", "rankings_per_step": 3, "rankings_per_micro_batch": 3},
    )
    assert rm["parent_id"] == sft["id"] and rm["metrics"]["saved_as"] == "adapter"
    assert rm_run["metrics"]["steps"] >= 1 and rm_run["metrics"]["n_train"] == 6
    assert (Path(rm["artifact_path"]) / "backbone" / "adapter_config.json").exists()
    assert rm_run["metrics"]["config"]["max_length"] == context

    # PPO from the SFT policy against that reward model: policy, reference, value and reward on one frozen base.
    ppo_run, ppo = _train(
        worker_client,
        headers,
        "ppo",
        {
            **SMALL,
            "steps": 1,
            "rollout_batch_size": 4,
            "minibatch_size": 2,
            "micro_batch_size": 2,
            "ppo_epochs": 1,
            "max_new_tokens": 8,
            "eval_size": 4,
        },
    )
    metrics = ppo_run["metrics"]
    assert ppo["parent_id"] == sft["id"] and ppo["lineage"] == {"sft": sft["id"], "rm": rm["id"]}
    assert ppo["metrics"]["algorithm"] == "ppo"
    assert ppo["metrics"]["saved_as"] == "merged" and metrics["frozen_bases"] == 1
    assert metrics["steps"] >= 1 and len(metrics["reward_curve"]) == 1
    assert metrics["config"]["max_prompt_length"] == context - 8
    # Only the policy's adapter trained: a small fraction of the model's parameters.
    assert 0 < metrics["trained_parameters"] < base["facts"]["parameters"] / 10

    # The trained versions are plain models, which differ from their parents only where the adapters were.
    base_class, base_weights = _plain_weights(base["artifact_path"])
    sft_class, sft_weights = _plain_weights(sft["artifact_path"])
    ppo_class, ppo_weights = _plain_weights(ppo["artifact_path"])
    assert base_class == sft_class == ppo_class == "LlamaForCausalLM"
    for parent, child, what in ((base_weights, sft_weights, "SFT"), (sft_weights, ppo_weights, "PPO")):
        changed = _changed(parent, child)
        assert changed, f"{what} left every weight as it was"
        assert all(any(mark in name for mark in ADAPTED) for name in changed), (what, sorted(changed))

    # The PPO policy samples the next batch through the worker.
    again = _sampled_batch(
        db,
        f"byom-next-{tag}",
        {source_user_in("train", tag): [p.text for p in generate_prompts(3, seed=4)]},
        policy_version_id=ppo["id"],
    )
    assert _made_by(db, again) == [ppo["id"]] * 3 * 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_a_registered_model_whose_context_is_shorter_than_the_default_lengths_fits_them_to_it(
    committed_session, tiny_models
):
    """The tiny GPT-2 has 64 positions; the trainers' defaults (max_length 1024, max_prompt_length 512) do not fit.

    The jobs cap the lengths at the model's context, and say so in the config they record, instead of failing
    with an IndexError from the position embedding on the first long example.
    """
    from app.models import ModelVersion
    from app.registry import versions as registry
    from app.runs import start_run
    from tests.test_training_data import collect, demonstrate_all, rank_all
    from worker import jobs

    db = committed_session
    bind_factories(db)
    found = collect(db, tag="a-rather-long-tag-" * 5)  # every prompt well over 64 characters, one token each
    base = db.scalar(select(ModelVersion).where(ModelVersion.kind == "base"))
    base.artifact_path = str(tiny_models["gpt2"])
    labeler = UserFactory()
    demonstrate_all(db, labeler, found["batch"])
    rank_all(db, labeler, found["batch"])
    db.commit()

    def train(kind: str, params: dict) -> dict:
        run_id = start_run(db, kind, params=params).id
        db.commit()
        metrics, version_id = getattr(jobs, f"run_{kind}")(run_id, lambda *a, **k: None)
        registry.mark_ready(db, version_id, metrics)
        db.commit()
        return metrics["config"]

    assert train("sft", {"epochs": 1, "batch_size": 2})["max_length"] == 64
    assert train("rm", {"rankings_per_step": 2})["max_length"] == 64
    ppo = train("ppo", {"steps": 1, "rollout_batch_size": 2, "minibatch_size": 2, "max_new_tokens": 16})
    assert ppo["max_prompt_length"] == 64 - 16 and ppo["max_new_tokens"] == 16
    # DPO from the rankings, with LoRA: a policy version from the SFT model, its metrics saying the algorithm.
    run_id = start_run(db, "dpo", params={"rankings_per_step": 2, "lora_r": 4, "loss": "listwise"}).id
    db.commit()
    metrics, version_id = jobs.run_dpo(run_id, lambda *a, **k: None)
    dpo = db.get(ModelVersion, version_id)
    sft = db.scalar(select(ModelVersion).where(ModelVersion.kind == "sft").order_by(ModelVersion.id.desc()))
    assert dpo.kind == "policy" and dpo.parent_id == sft.id and dpo.lineage == {"sft": sft.id}
    assert metrics["algorithm"] == "dpo" and metrics["config"]["max_length"] == 64 and metrics["steps"] >= 1
    assert metrics["saved_as"] == "merged" and metrics["forward_rows_per_epoch"] >= 4


def test_a_model_with_a_short_context_samples_prompts_longer_than_it_keeping_their_end(tiny_models):
    """The tiny GPT-2 has 64 positions: a longer prompt keeps its last tokens, and generation stays inside them."""
    from worker.generate import sample_completions
    from worker.modeling import load_model

    model, tokenizer = load_model(tiny_models["gpt2"], "cpu")
    prompt = "what is " + "one plus two and " * 10 + "three?"
    assert len(tokenizer(prompt)["input_ids"]) > 64
    for max_new_tokens in (8, 100):
        rows = sample_completions(model, tokenizer, [prompt, "hi"], 2, max_new_tokens=max_new_tokens, seed=0)
        assert [len(row) for row in rows] == [2, 2] and all(isinstance(t, str) for row in rows for t in row)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_each_architecture_trains_sft_rm_and_ppo_with_lora_on_one_base(tiny_models, tmp_path, arch):
    """peft's default targets per architecture (GPT-2's fused Conv1D c_attn, Llama/Qwen2's q/v projections)
    train, merge on save and load as plain models; PPO runs its four networks on one frozen base."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.training.configs import PPOConfig, RMConfig, SFTConfig
    from worker.train_ppo import train_ppo
    from worker.train_rm import RankingExample, train_rm
    from worker.train_sft import train_sft

    base = tiny_models[arch]
    memory = {"lora_r": 4, "lora_dropout": 0.0, "device": "cpu"}
    pairs = [(f"Say {w}", f"{w} {w}") for w in ("ab", "ba", "cab", "abc", "bca", "cc")]
    sft = train_sft(base, pairs, [], SFTConfig(epochs=1, batch_size=3, learning_rate=1e-2, max_length=48, **memory),
                    tmp_path / "sft")  # fmt: skip
    assert sft["saved_as"] == "merged" and sft["steps"] == 2
    rankings = [RankingExample(p, [c, c[::-1] + "x", "zz"], [1, 2, 3]) for p, c in pairs]
    rm = train_rm(tmp_path / "sft", rankings, [], RMConfig(epochs=1, rankings_per_step=3, learning_rate=1e-2,
                  max_length=48, lora_save="adapter", **memory), tmp_path / "rm")  # fmt: skip
    assert rm["saved_as"] == "adapter" and (tmp_path / "rm" / "backbone" / "adapter_config.json").exists()
    config = PPOConfig(steps=1, rollout_batch_size=4, minibatch_size=4, micro_batch_size=2, ppo_epochs=1,
                       max_new_tokens=6, max_prompt_length=24, eval_size=2, learning_rate=1e-2, **memory)  # fmt: skip
    ppo = train_ppo(tmp_path / "sft", tmp_path / "rm", [p for p, _ in pairs], config, tmp_path / "policy")
    assert ppo["frozen_bases"] == 1 and ppo["saved_as"] == "merged"
    models = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("sft", "policy")}
    parent = AutoModelForCausalLM.from_pretrained(base)
    for name, child in (("sft", models["sft"]), ("policy", models["policy"])):
        before = parent if name == "sft" else models["sft"]
        assert not any("lora_" in n for n, _ in child.named_parameters())
        changed = {n for n, p in child.named_parameters() if not torch.equal(p, before.get_parameter(n))}
        targets = ("c_attn",) if arch == "gpt2" else ("q_proj", "v_proj")
        assert changed and all(any(t in n for t in targets) for n in changed), (name, changed)
