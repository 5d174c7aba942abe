"""Learning proof: the whole InstructGPT loop on the bundled world, with simulated people, measured by the true score.

For each seed, in process and without a database: the shipped base model
(models/world-base) → simulated demonstrations of train prompts → SFT →
K = 4..6 samples per prompt from the SFT model → simulated labelers rank them
(true score + noise tuned to ~73 % agreement between two labelers) → reward
model → PPO against the reward model (KL β = 0.1) → evaluation on held-out
test prompts. The trainers are called directly (worker/train_*.py, the
functions the worker's jobs run) by worker/experiment.py, the loop this
benchmark shares with tests/test_learning.py. Because the bundled world has a true scorer
(app.world.score), each stage is judged by real quality, not by its own
metric: base, SFT and PPO answer the same test prompts with the same greedy
decoding and are scored by the true scorer; the reward model's held-out
pairwise accuracy is shown beside the noise ceiling (the true scorer's own
accuracy on the same noisy held-out rankings); the policy's KL to SFT is
measured on the test prompts. As a second view, samples at temperature 1 (the
distribution PPO optimises) are scored too. Results and the account of where
each stage's headroom comes from are in bench/RESULTS.md ("learning"). Prints
progress to stderr and one JSON object with all figures as its last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import spread  # noqa: E402
from worker.experiment import FULL, PPO, QUICK, SMALL, run_loop  # noqa: E402


def log(message: str) -> None:
    """Progress to stderr, so stdout stays clean for the JSON line."""
    print(message, file=sys.stderr, flush=True)


def run_seed(seed: int, sizes: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One full loop (SFT → rankings → RM → PPO) for one seed; returns its figures."""
    return run_loop(
        seed,
        sizes,
        workdir,
        base=args.base,
        kl_coef=args.kl_coef,
        demo_error_rate=args.demo_error_rate,
        max_new_tokens=args.max_new_tokens,
        lora=lora_options(args),
        lora_lr_scale=args.lora_lr_scale,
        log=log,
    )


def lora_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The trainers' memory options for --lora R (None: full fine-tuning)."""
    if not args.lora:
        return None
    return {"lora_r": args.lora, "lora_alpha": 2 * args.lora, "lora_target_modules": args.lora_targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, each a full loop")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here (FIRST..FIRST+N-1)")
    sizes_group = parser.add_mutually_exclusive_group()
    sizes_group.add_argument(
        "--quick", action="store_true", help="one seed, tiny sizes (well under 2 min): a smoke run"
    )
    sizes_group.add_argument(
        "--small",
        action="store_true",
        help="the sizes of tests/test_learning.py (~2 min per seed), to measure its seed spread",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine 2 threads are often ~10x slower here)",
    )
    parser.add_argument("--base", default=str(ROOT / "models" / "world-base"), help="base model path")
    parser.add_argument(
        "--kl-coef",
        type=float,
        default=PPO["kl_coef"],
        help="PPO's KL coefficient β (0.02, InstructGPT's, lets PPO overfit this small reward model)",
    )
    parser.add_argument("--demo-error-rate", type=float, default=0.2, help="simulated demonstrators' error rate")
    parser.add_argument(
        "--lora", type=int, default=0, help="train LoRA adapters of this rank in every stage (0: full fine-tuning)"
    )
    parser.add_argument(
        "--lora-lr-scale", type=float, default=10.0, help="with --lora, every stage's learning rate times this"
    )
    parser.add_argument(
        "--lora-targets", default="all-linear", help="with --lora, the modules that get adapters (peft's names)"
    )
    parser.add_argument("--keep", default=None, help="keep each seed's SFT, RM and policy under this folder")
    parser.add_argument(
        "--max-new-tokens", type=int, default=PPO["max_new_tokens"], help="longest completion, in tokens"
    )
    for name, value in FULL.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(value),
            default=None,
            help=f"override (full run: {value}, --small: {SMALL[name]}, --quick: {QUICK[name]})",
        )
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    sizes = dict(QUICK if args.quick else SMALL if args.small else FULL)
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        if args.keep:
            runs.append(run_seed(seed, sizes, args, Path(args.keep) / f"seed-{seed}"))
            continue
        with tempfile.TemporaryDirectory(prefix=f"learning-{seed}-") as tmp:
            runs.append(run_seed(seed, sizes, args, Path(tmp)))
    wall = time.perf_counter() - started

    figures = ["base_true", "sft_true", "ppo_true", "rm_accuracy", "noise_ceiling", "labeler_agreement", "ppo_kl"]
    summary = {name: spread([r[name] for r in runs]) for name in figures}
    for name in ("base", "sft", "ppo"):
        summary[f"{name}_sampled_true"] = spread([r["sampled_true"][name] for r in runs])
    gains = {
        "sft_minus_base": spread([r["sft_true"] - r["base_true"] for r in runs]),
        "ppo_minus_sft": spread([r["ppo_true"] - r["sft_true"] for r in runs]),
        "ppo_minus_sft_sampled": spread([r["sampled_true"]["ppo"] - r["sampled_true"]["sft"] for r in runs]),
        "ceiling_minus_rm": spread([r["noise_ceiling"] - r["rm_accuracy"] for r in runs]),
        "ppo_rm_reward_gain": spread([r["ppo_rm_reward_after"] - r["ppo_rm_reward_before"] for r in runs]),
    }

    def beats(key: str, sft: str, ppo: str) -> bool:
        # "By more than the seed-to-seed spread": the mean gain exceeds the larger per-seed std of the two.
        return gains[key]["mean"] > max(summary[sft]["std"], summary[ppo]["std"])

    aims = {
        "sft_above_base": all(r["sft_true"] > r["base_true"] for r in runs),
        "ppo_above_sft_by_more_than_spread": beats("ppo_minus_sft", "sft_true", "ppo_true"),
        "ppo_above_sft_every_seed": all(r["ppo_true"] > r["sft_true"] for r in runs),
        "ppo_above_sft_by_more_than_spread_sampled": beats(
            "ppo_minus_sft_sampled", "sft_sampled_true", "ppo_sampled_true"
        ),
        "rm_within_3_points_of_ceiling": gains["ceiling_minus_rm"]["mean"] <= 0.03,
        "under_15_minutes": wall < 15 * 60,
    }
    result = {
        "benchmark": "learning",
        "quick": args.quick,
        "small": args.small,
        "seeds": seeds,
        "threads": args.threads,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(wall, 1),
        "sizes": sizes,
        "kl_coef": args.kl_coef,
        "lora": lora_options(args),
        "lora_lr_scale": args.lora_lr_scale if args.lora else None,
        "summary": summary,
        "gains": gains,
        "aims": aims,
        "runs": runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
