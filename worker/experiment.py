"""The whole InstructGPT loop on the bundled world, in process, judged by the world's true scorer.

The learning benchmark (bench/learning.py) and the learning test (tests/test_learning.py) both run this loop:
the shipped base model (models/world-base) → simulated demonstrations of train prompts → SFT → K = 4..6
samples per prompt from the SFT model → simulated labelers rank them (true score + noise tuned to ~73 %
agreement between two labelers) → reward model → PPO against the reward model → evaluation on held-out test
prompts. The trainers are the functions the worker's jobs run (worker/train_*.py), called directly without a
database. Because the bundled world has a true scorer (app.world.score), each stage is judged by real quality,
not by its own metric: base, SFT and PPO answer the same test prompts with the same greedy decoding and are
scored by the true scorer; the reward model's held-out pairwise accuracy is shown beside the noise ceiling
(the true scorer's own accuracy on the same noisy held-out rankings); the policy's KL to SFT and the reward
model's mean score are measured on the test prompts. With one torch thread on CPU a run is deterministic per
seed.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = ROOT / "models" / "world-base"
# The trainer settings the product ships for the world model (the worker applies them to runs descended from
# it), so the loop measures what a user of the embedded default gets.
RECIPE = json.loads((BASE_MODEL / "training_recipe.json").read_text())
SFT, RM, PPO = RECIPE["sft"], RECIPE["rm"], RECIPE["ppo"]
# Sizes of the benchmark's full run; every one can be overridden on its command line.
FULL = {
    "demos": 600,
    "sft_valid": 60,
    "sft_epochs": SFT["epochs"],
    "sft_lr": SFT["learning_rate"],
    "rm_prompts": 900,
    "rm_valid_prompts": 200,
    "rm_epochs": RM["epochs"],
    "rm_lr": RM["learning_rate"],
    "rm_batch": RM["rankings_per_step"],
    "ppo_steps": PPO["steps"],
    "ppo_batch": PPO["rollout_batch_size"],
    "ppo_lr": PPO["learning_rate"],
    "ppo_value_lr": PPO["value_learning_rate"],
    "ppo_epochs": PPO["ppo_epochs"],
    "ppo_lr_schedule": PPO["lr_schedule"],
    "test_prompts": 200,
}
# A smoke run (well under a minute): too small for PPO to learn anything, only that every stage runs.
QUICK = {
    "demos": 120,
    "sft_valid": 20,
    "sft_epochs": 4,
    "sft_lr": 1e-3,
    "rm_prompts": 80,
    "rm_valid_prompts": 40,
    "rm_epochs": 2,
    "rm_lr": 3e-4,
    "rm_batch": 4,
    "ppo_steps": 6,
    "ppo_batch": 16,
    "ppo_lr": 3e-5,
    "ppo_value_lr": 1e-3,
    "ppo_epochs": 2,
    "ppo_lr_schedule": "constant",
    "test_prompts": 60,
}
# The learning test's loop: the shipped recipe with fewer demonstrations, rankings and PPO steps, sized to
# about two minutes on one core; its seed spread is in bench/RESULTS.md ("learning test").
SMALL = dict(
    FULL,
    demos=400,
    sft_valid=40,
    rm_prompts=500,
    rm_valid_prompts=60,
    ppo_steps=16,
    test_prompts=100,
)
N_LABELERS = 5
TEST_SEED = 424242  # the test prompts are the same for every seed, so seeds differ only in training
_BASE_EVALUATIONS: dict[tuple[str, int, int, bool], dict[str, Any]] = {}


def mean(values: list[float]) -> float:
    """Arithmetic mean (0.0 of nothing)."""
    return sum(values) / len(values) if values else 0.0


def world_score(prompt: str, completion: str) -> float:
    """The world's true score of a completion; every prompt of this experiment is a world prompt."""
    from app.world import score

    found = score(prompt, completion)
    if found is None:
        raise ValueError(f"not a prompt of the bundled world: {prompt[:80]!r}")
    return found


def true_scores(prompts: list[Any], completions: list[str]) -> list[float]:
    """The world's true score of each completion."""
    return [world_score(p, c) for p, c in zip(prompts, completions, strict=True)]


def greedy_eval(model_path: str | Path, prompts: list[Any], max_new_tokens: int, sampled: bool = True) -> dict:
    """Greedy answers of a model to the test prompts, scored by the true scorer, overall and per family."""
    from worker.generate import sample_completions
    from worker.modeling import load_model

    model, tokenizer = load_model(model_path, device="cpu")
    texts = [p.text for p in prompts]
    answers = [
        row[0]
        for row in sample_completions(
            model,
            tokenizer,
            texts,
            1,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            batch_size=64,
            max_resample_tries=0,
        )
    ]
    scores = true_scores(texts, answers)
    sampled_score = None
    if sampled:
        # A second view: the true score of samples at temperature 1, the distribution PPO optimises.
        samples = sample_completions(
            model,
            tokenizer,
            texts,
            2,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            batch_size=96,
            seed=0,
            max_resample_tries=0,
        )
        sampled_score = mean(true_scores([t for t in texts for _ in range(2)], [c for row in samples for c in row]))
    by_family: dict[str, list[float]] = defaultdict(list)
    for prompt, value in zip(prompts, scores, strict=True):
        by_family[prompt.family].append(value)
    return {
        "true_score": mean(scores),
        "sampled_true_score": sampled_score,
        "by_family": {f: round(mean(v), 4) for f, v in sorted(by_family.items())},
        "words": mean([len(a.split()) for a in answers]),
        "examples": [[t, a] for t, a in list(zip(texts, answers, strict=True))[:6]],
    }


def noise_ceiling(rankings: list[Any]) -> tuple[float, float]:
    """Accuracy of the true scorer itself on the labelers' non-tied held-out pairs, and the pair count."""

    correct = pairs = 0.0
    for ranking in rankings:
        truth = [world_score(ranking.prompt, c) for c in ranking.completions]
        for i, ri in enumerate(ranking.ranks):
            for j, rj in enumerate(ranking.ranks):
                if ri < rj:
                    pairs += 1
                    correct += 1.0 if truth[i] > truth[j] else 0.5 if truth[i] == truth[j] else 0.0
    return correct / pairs if pairs else 0.0, pairs


def run_loop(
    seed: int,
    sizes: dict[str, Any],
    workdir: Path,
    *,
    base: str | Path = BASE_MODEL,
    kl_coef: float = PPO["kl_coef"],
    demo_error_rate: float = 0.2,
    max_new_tokens: int = PPO["max_new_tokens"],
    sampled_view: bool = True,
    lora: dict[str, Any] | None = None,
    lora_lr_scale: float = 1.0,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """One full loop (SFT → rankings → RM → PPO → evaluation) for one seed in workdir; returns its figures.

    With `lora` (memory options such as {"lora_r": 8}) every trainer trains LoRA adapters instead of all
    weights, at its learning rate times lora_lr_scale; the reward model is saved as an adapter on the SFT
    model, so PPO runs its four networks on one frozen base.
    """
    memory = dict(lora or {})
    rm_memory = {**memory, "lora_save": "adapter"} if memory else {}
    lr_scale = lora_lr_scale if memory else 1.0
    from app.world import (
        DEFAULT_NOISE,
        SimulatedDemonstrator,
        SimulatedLabeler,
        generate_prompts,
    )
    from app.world.labelers import pairwise_agreement
    from worker.generate import sample_completions
    from worker.modeling import load_model
    from worker.train_ppo import PPOConfig, train_ppo
    from worker.train_rm import RankingExample, RMConfig, train_rm
    from worker.train_sft import SFTConfig, train_sft

    workdir = Path(workdir)
    timings: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    test = generate_prompts(sizes["test_prompts"], seed=TEST_SEED)
    held_out = {p.text for p in test}
    n_pool = sizes["demos"] + sizes["sft_valid"] + sizes["rm_prompts"] + sizes["rm_valid_prompts"]
    # Fact questions are a small finite set, so the pool repeats some; test prompts never enter training.
    pool = [p for p in generate_prompts(3 * n_pool, seed=1000 + seed, unique=False) if p.text not in held_out]
    cut = [sizes["demos"], sizes["sft_valid"], sizes["rm_prompts"], sizes["rm_valid_prompts"]]
    demo_prompts, sft_valid_prompts, rm_prompts, rm_valid_prompts = (
        pool[sum(cut[:i]) : sum(cut[: i + 1])] for i in range(4)
    )

    # ---- 1. demonstrations and SFT
    t = time.perf_counter()
    demonstrator = SimulatedDemonstrator(error_rate=demo_error_rate, seed=seed)
    demos = [(p.text, demonstrator.demonstrate(p)) for p in demo_prompts]
    sft_valid = [(p.text, demonstrator.demonstrate(p)) for p in sft_valid_prompts]
    sft_dir = workdir / "sft"
    sft = train_sft(
        base,
        demos,
        sft_valid,
        SFTConfig(
            **{
                **SFT,
                "epochs": sizes["sft_epochs"],
                "learning_rate": sizes["sft_lr"] * lr_scale,
                "early_stopping_patience": None,
                "seed": seed,
                "device": "cpu",
                **memory,
            }
        ),
        sft_dir,
    )
    timings["sft_s"] = time.perf_counter() - t
    log(
        f"[seed {seed}] SFT: valid loss {sft['initial_valid_loss']:.3f} -> {sft['valid_loss']:.3f} "
        f"(best epoch {sft['best_epoch']}) in {timings['sft_s']:.0f}s"
    )

    # ---- 2. K = 4..6 samples per prompt from SFT, ranked by simulated labelers
    t = time.perf_counter()
    model, tokenizer = load_model(sft_dir, device="cpu")
    rng = random.Random(seed)
    labelers = {f"labeler-{i}": SimulatedLabeler(DEFAULT_NOISE, seed=100 * seed + i) for i in range(N_LABELERS)}
    second_opinion = SimulatedLabeler(DEFAULT_NOISE, seed=100 * seed + 99)

    def rankings_for(prompts: list[Any], sample_seed: int) -> tuple[list[RankingExample], list[list[int]]]:
        ks = [rng.randint(4, 6) for _ in prompts]
        # One sampling call per K, so every prompt gets exactly its K distinct completions.
        completions: dict[int, list[str]] = {}
        for k in sorted(set(ks)):
            idx = [i for i, ki in enumerate(ks) if ki == k]
            rows = sample_completions(
                model,
                tokenizer,
                [prompts[i].text for i in idx],
                k,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                batch_size=96,
                seed=sample_seed + k,
            )
            completions.update(zip(idx, rows, strict=True))
        rankings, others = [], []
        for i, prompt in enumerate(prompts):
            name = f"labeler-{i % N_LABELERS}"
            ranks = labelers[name].rank(prompt.text, completions[i])
            rankings.append(RankingExample(prompt.text, completions[i], ranks, labeler=name))
            others.append(second_opinion.rank(prompt.text, completions[i]))
        return rankings, others

    rm_train, _ = rankings_for(rm_prompts, 10_000 * seed + 1)
    rm_valid, second = rankings_for(rm_valid_prompts, 10_000 * seed + 2)
    agree = total = 0
    for ranking, other in zip(rm_valid, second, strict=True):
        a, n = pairwise_agreement(ranking.ranks, other)
        agree, total = agree + a, total + n
    ceiling, _ = noise_ceiling([r for r in rm_valid if r.n_pairs])
    sampled_true = mean([s for r in rm_train for s in true_scores([r.prompt] * len(r.completions), r.completions)])
    timings["rank_s"] = time.perf_counter() - t
    log(
        f"[seed {seed}] rankings: {len(rm_train)} train, {len(rm_valid)} held-out; labeler agreement "
        f"{agree / max(total, 1):.3f}; true score of SFT samples (T=1) {sampled_true:.3f}; in {timings['rank_s']:.0f}s"
    )

    # ---- 3. reward model from the SFT model
    t = time.perf_counter()
    rm_dir = workdir / "rm"
    rm = train_rm(
        sft_dir,
        rm_train,
        rm_valid,
        RMConfig(
            **{
                **RM,
                "epochs": sizes["rm_epochs"],
                "learning_rate": sizes["rm_lr"] * lr_scale,
                "rankings_per_step": sizes["rm_batch"],
                "rankings_per_micro_batch": sizes["rm_batch"],
                "seed": seed,
                "device": "cpu",
                **rm_memory,
            }
        ),
        rm_dir,
        demonstrations=demos,
    )
    timings["rm_s"] = time.perf_counter() - t
    log(
        f"[seed {seed}] RM: held-out accuracy {rm['initial_valid_accuracy']:.3f} -> {rm['valid_accuracy']:.3f} "
        f"(ceiling {ceiling:.3f}) in {timings['rm_s']:.0f}s"
    )

    # ---- 4. PPO against the reward model
    t = time.perf_counter()
    ppo_dir = workdir / "policy"
    ppo_prompts = [p.text for p in demo_prompts + rm_prompts]
    ppo_config = PPOConfig(
        **{
            **PPO,
            "steps": sizes["ppo_steps"],
            "rollout_batch_size": sizes["ppo_batch"],
            "minibatch_size": sizes["ppo_batch"] // 4,
            "micro_batch_size": sizes["ppo_batch"] // 4,
            "ppo_epochs": sizes["ppo_epochs"],
            "learning_rate": sizes["ppo_lr"] * lr_scale,
            "value_learning_rate": sizes["ppo_value_lr"] * lr_scale,
            "lr_schedule": sizes["ppo_lr_schedule"],
            "kl_coef": kl_coef,
            "max_new_tokens": max_new_tokens,
            "eval_batch_size": 64,
            "seed": seed,
            "checkpoint_every": 10_000,
            "device": "cpu",
            **memory,
        }
    )

    def ppo_progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step % max(1, total // 8) == 0 or step == total:
            log(
                f"[seed {seed}]   PPO {step}/{total}: RM reward {metrics['reward']:+.3f} KL {metrics['kl']:.3f} "
                f"clip {metrics.get('clipfrac', 0):.3f} value loss {metrics.get('value_loss', 0):.3f} "
                f"entropy {metrics.get('entropy', 0):.3f}"
            )

    ppo = train_ppo(
        sft_dir, rm_dir, ppo_prompts, ppo_config, ppo_dir, eval_prompts=[p.text for p in test], progress=ppo_progress
    )
    timings["ppo_s"] = time.perf_counter() - t
    log(
        f"[seed {seed}] PPO: RM reward on test {ppo['eval_initial']['reward']:+.3f} -> {ppo['eval']['reward']:+.3f}, "
        f"KL to SFT {ppo['eval']['kl']:.3f} in {timings['ppo_s']:.0f}s"
    )

    # ---- 5. the true score of base, SFT and PPO on the test prompts (greedy, same settings)
    t = time.perf_counter()
    key = (str(base), sizes["test_prompts"], max_new_tokens, sampled_view)
    if key not in _BASE_EVALUATIONS:  # the same base model and test prompts for every seed: evaluate once
        _BASE_EVALUATIONS[key] = greedy_eval(base, test, max_new_tokens, sampled_view)
    evaluations = {"base": _BASE_EVALUATIONS[key]}
    evaluations.update(
        {
            name: greedy_eval(path, test, max_new_tokens, sampled_view)
            for name, path in (("sft", sft_dir), ("ppo", ppo_dir))
        }
    )
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    # CPU seconds of this process: on a shared machine the wall time grows with the load, this hardly does.
    timings["cpu_s"] = time.process_time() - cpu_started
    log(
        f"[seed {seed}] true score (greedy, test): base {evaluations['base']['true_score']:.3f}, "
        f"SFT {evaluations['sft']['true_score']:.3f}, PPO {evaluations['ppo']['true_score']:.3f}"
        + (
            f" (T=1 samples: SFT {evaluations['sft']['sampled_true_score']:.3f}, "
            f"PPO {evaluations['ppo']['sampled_true_score']:.3f})"
            if sampled_view
            else ""
        )
        + f"; seed total {timings['total_s']:.0f}s ({timings['cpu_s']:.0f}s CPU)"
    )
    return {
        "seed": seed,
        "base_true": evaluations["base"]["true_score"],
        "sft_true": evaluations["sft"]["true_score"],
        "ppo_true": evaluations["ppo"]["true_score"],
        "sampled_true": {
            name: None if e["sampled_true_score"] is None else round(e["sampled_true_score"], 4)
            for name, e in evaluations.items()
        },
        "by_family": {name: e["by_family"] for name, e in evaluations.items()},
        "answer_words": {name: round(e["words"], 3) for name, e in evaluations.items()},
        "examples": {name: e["examples"] for name, e in evaluations.items()},
        "sft_valid_loss": sft["valid_loss"],
        "sft_samples_true": sampled_true,
        "labeler_agreement": agree / max(total, 1),
        "rm_accuracy": rm["valid_accuracy"],
        "rm_initial_accuracy": rm["initial_valid_accuracy"],
        "noise_ceiling": ceiling,
        "rm_valid_pairs": rm["valid_pairs"],
        "rm_labeler_agreement": rm["labeler_agreement"],
        "ppo_kl": ppo["eval"]["kl"],
        "ppo_rm_reward_before": ppo["eval_initial"]["reward"],
        "ppo_rm_reward_after": ppo["eval"]["reward"],
        "ppo_reward_curve": [round(r, 4) for r in ppo["reward_curve"]],
        "ppo_kl_curve": [round(k, 4) for k in ppo["kl_curve"]],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "ppo_config": asdict(ppo_config),
    }
