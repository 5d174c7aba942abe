"""Reward-model training speed: our K-way trainer against TRL's RewardTrainer on the same rankings and model.

Both train the same tiny model (the bundled world's base model, models/world-base)
for one epoch on the same rankings of world prompts, at K = 4 and at K = 9
completions per ranking, in the same process, one after the other. Ours
(worker.train_rm) sends the K completions of a ranking through the model once
and takes the mean pairwise loss over the ranking's non-tied pairs; TRL gets
the same rankings exploded into (chosen, rejected) pairs, one example per
non-tied pair, as its RewardTrainer expects. Both get the same rankings, epochs,
learning rate and schedule; a step of ours holds 4 whole rankings (the paper's
batches are of whole rankings), one of TRL's 32 pairs drawn across rankings
(`--rankings-per-step 0` gives ours as many pairs per step as TRL's instead:
at K = 9 that is one ranking, one prompt's correlated pairs, per step, which
costs ours about 2 points of accuracy). Throughput is rankings per second
of the training loop (timed between the first and last optimizer step, scaled
to all steps, the same way for both), in wall time and in this process's CPU
time (the steadier figure on a shared machine); accuracy is the pairwise accuracy of
each trained model on the same held-out rankings, scored by the same code,
beside the noise ceiling (the true scorer's own accuracy on those noisy
labels). One epoch on a few hundred rankings leaves each accuracy a point or
two from where another draw of the data would put it, so every K is repeated
on `--repeats` independent draws of train and held-out rankings and the
accuracies are compared by their mean and spread. TRL is a benchmark-only
dependency: `.venv/bin/pip install trl`. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import spread  # noqa: E402

OFF_TOPIC = "the river runs silver and the hills are green"


def make_rankings(n: int, k: int, seed: int) -> list[Any]:
    """n rankings of k distinct world answers (imperfect demonstrations, distractors), ranked by simulated labelers."""
    from app.world import DEFAULT_NOISE, SimulatedLabeler, demonstrate, generate_prompts
    from worker.train_rm import RankingExample

    rng = random.Random(seed)
    prompts = generate_prompts(n, seed=seed, unique=False)
    labelers = [SimulatedLabeler(DEFAULT_NOISE, seed=seed * 10 + i) for i in range(5)]
    rankings = []
    for i, prompt in enumerate(prompts):
        completions: list[str] = []
        for _ in range(60):  # a careless demonstrator writes many variants: right, wrong, wordy
            text = demonstrate(prompt, rng, error_rate=0.5)
            if text not in completions:
                completions.append(text)
            if len(completions) == k:
                break
        # Few distinct variants exist for some prompts: fill with answers to other prompts and off-topic text.
        while len(completions) < k:
            other = rng.choice([OFF_TOPIC, rng.choice(prompts).answer, rng.choice(prompts).answer])
            if other not in completions:
                completions.append(other)
        rng.shuffle(completions)
        labeler = labelers[i % len(labelers)]
        rankings.append(
            RankingExample(
                prompt.text, completions, labeler.rank(prompt.text, completions), labeler=f"labeler-{i % len(labelers)}"
            )
        )
    return [r for r in rankings if r.n_pairs]


def explode(rankings: list[Any], tokenizer: Any) -> list[dict[str, str]]:
    """TRL's format: one (prompt, chosen, rejected) example per non-tied pair of every ranking."""
    from worker.modeling import format_prompt

    pairs = []
    for r in rankings:
        prompt = format_prompt(tokenizer, r.prompt)
        for i, ri in enumerate(r.ranks):
            for j, rj in enumerate(r.ranks):
                if ri < rj:
                    # The same text our trainer sees: format_prompt(prompt) + " " + completion (+ EOS, added by TRL).
                    chosen, rejected = " " + r.completions[i], " " + r.completions[j]
                    pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def held_out_accuracy(score_fn: Any, rankings: list[Any]) -> float:
    """Pairwise accuracy on the rankings' non-tied pairs, from one score per completion (ties count half)."""
    import torch

    from worker.train_rm import pair_outcomes

    correct = pairs = 0.0
    for r in rankings:
        ok, n = pair_outcomes(torch.tensor(score_fn(r.prompt, r.completions)), r.ranks)
        correct, pairs = correct + ok, pairs + n
    return correct / pairs


def noise_ceiling(rankings: list[Any]) -> float:
    """The true scorer's own accuracy on the labelers' noisy held-out pairs."""
    from app.world import score

    return held_out_accuracy(lambda p, cs: [score(p, c) for c in cs], rankings)


class StepClock:
    """Timestamps of optimizer steps; the loop time is their span scaled to all steps (same rule for both trainers).

    Wall time and this process's CPU time are both kept: on a shared machine the wall time of a loop depends on
    what else ran meanwhile, while its CPU time (one torch thread) does not."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def tick(self) -> None:
        """Records one optimizer step."""
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

    def loop_seconds(self, cpu: bool = False) -> float:
        """Span from the first to the last step, scaled by steps/(steps − 1) to count the first step too."""
        times = self.cpu_times if cpu else self.times
        n = len(times)
        if n < 2:
            raise RuntimeError("need at least two optimizer steps to time the loop")
        return (times[-1] - times[0]) * n / (n - 1)


def matched_rankings_per_step(rankings: list[Any], pairs_per_step: int) -> int:
    """Rankings per step holding about as many pairs as TRL's step, so both take about as many optimizer steps."""
    pairs_per_ranking = sum(r.n_pairs for r in rankings) / len(rankings)
    return max(1, round(pairs_per_step / pairs_per_ranking))


def run_ours(
    base: str,
    train: list[Any],
    valid: list[Any],
    args: argparse.Namespace,
    out: Path,
    epochs: int = 1,
    loss: str = "pairwise",
) -> dict[str, Any]:
    """Trains our K-way reward model (all-pairs or listwise loss); returns throughput and held-out accuracy."""
    from worker.train_rm import RMConfig, load_reward_model, score_completions, train_rm

    clock = StepClock()
    per_step = args.rankings_per_step or matched_rankings_per_step(train, args.pairs_per_step)
    config = RMConfig(
        epochs=epochs,
        learning_rate=args.lr,
        rankings_per_step=per_step,
        rankings_per_micro_batch=per_step,
        warmup_ratio=0.03,
        max_length=128,
        seed=0,
        device="cpu",
        loss=loss,
    )
    started = time.perf_counter()
    train_rm(base, train, [], config, out, progress=lambda step, total, metrics: clock.tick())
    end_to_end = time.perf_counter() - started
    rm, tokenizer = load_reward_model(out)
    accuracy = held_out_accuracy(lambda p, cs: score_completions(rm, tokenizer, [p] * len(cs), cs), valid)
    loop, cpu = clock.loop_seconds(), clock.loop_seconds(cpu=True)
    rows = sum(len(r.completions) for r in train)
    return {
        "loop_s": round(loop, 2),
        "loop_cpu_s": round(cpu, 2),
        "end_to_end_s": round(end_to_end, 2),
        "optimizer_steps": len(clock.times),
        "rankings_per_step": per_step,
        "rankings_per_s": round(epochs * len(train) / loop, 2),
        "rankings_per_cpu_s": round(epochs * len(train) / cpu, 2),
        "forward_rows": epochs * rows,
        "held_out_accuracy": round(accuracy, 4),
    }


def run_trl(base: str, train: list[Any], valid: list[Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Trains TRL's RewardTrainer on the exploded pairs; returns throughput and held-out accuracy."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from worker.modeling import format_prompt, load_model

    _, tokenizer = load_model(base, device="cpu")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = explode(train, tokenizer)
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.tick()

    config = RewardConfig(
        output_dir=str(out),
        num_train_epochs=1,
        learning_rate=args.lr,
        per_device_train_batch_size=args.pairs_per_step,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=128,
        # The fast settings on CPU: no bf16 autocast, no gradient checkpointing (TRL's defaults are for GPUs).
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    started = time.perf_counter()
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for the JSON line
        trainer.train()
    end_to_end = time.perf_counter() - started
    trained = trainer.model.eval()

    @torch.no_grad()
    def scores(prompt: str, completions: list[str]) -> list[float]:
        # TRL's own tokenisation: prompt + completion + EOS as one string, right-padded.
        texts = [format_prompt(tokenizer, prompt) + " " + c + tokenizer.eos_token for c in completions]
        tokenizer.padding_side = "right"
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tokenizer.padding_side = "left"
        return trained(**enc).logits.squeeze(-1).tolist()

    accuracy = held_out_accuracy(scores, valid)
    loop, cpu = clock.loop_seconds(), clock.loop_seconds(cpu=True)
    return {
        "loop_s": round(loop, 2),
        "loop_cpu_s": round(cpu, 2),
        "end_to_end_s": round(end_to_end, 2),
        "optimizer_steps": len(clock.times),
        "rankings_per_s": round(len(train) / loop, 2),
        "rankings_per_cpu_s": round(len(train) / cpu, 2),
        "pairs": len(pairs),
        "forward_rows": 2 * len(pairs),
        "held_out_accuracy": round(accuracy, 4),
    }


def compare(k: int, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    """Ours and TRL (and ours for more epochs, if asked) on one draw of K-completion rankings."""
    train = make_rankings(args.rankings, k, seed=k + 100 * repeat)
    valid = make_rankings(args.valid, k, seed=1000 + k + 100 * repeat)
    with tempfile.TemporaryDirectory(prefix=f"reward-speed-{k}-") as tmp:
        ours = run_ours(args.model, train, valid, args, Path(tmp) / "ours")
        print(f"K={k} repeat {repeat} ours: {ours}", file=sys.stderr, flush=True)
        listwise = run_ours(args.model, train, valid, args, Path(tmp) / "listwise", loss="listwise")
        print(f"K={k} repeat {repeat} ours, listwise: {listwise}", file=sys.stderr, flush=True)
        theirs = None if args.skip_trl else run_trl(args.model, train, valid, args, Path(tmp) / "trl")
        print(f"K={k} repeat {repeat} TRL: {theirs}", file=sys.stderr, flush=True)
        longer = None
        if args.extra_epochs > 1:
            longer = run_ours(args.model, train, valid, args, Path(tmp) / "ours-longer", epochs=args.extra_epochs)
            print(f"K={k} repeat {repeat} ours, {args.extra_epochs} epochs: {longer}", file=sys.stderr, flush=True)
    result = {
        "repeat": repeat,
        "train_rankings": len(train),
        "valid_rankings": len(valid),
        "noise_ceiling": round(noise_ceiling(valid), 4),
        "ours": ours,
        "listwise": listwise,
        "listwise_minus_pairwise": round(listwise["held_out_accuracy"] - ours["held_out_accuracy"], 4),
    }
    if theirs is not None:
        result |= {
            "trl": theirs,
            "speedup": round(ours["rankings_per_s"] / theirs["rankings_per_s"], 2),
            "cpu_speedup": round(ours["rankings_per_cpu_s"] / theirs["rankings_per_cpu_s"], 2),
            "accuracy_difference": round(ours["held_out_accuracy"] - theirs["held_out_accuracy"], 4),
            "listwise_accuracy_difference": round(listwise["held_out_accuracy"] - theirs["held_out_accuracy"], 4),
        }
    if longer and theirs is not None:
        # Our trainer given more passes: its time against TRL's one epoch, and the accuracy it reaches.
        result[f"ours_{args.extra_epochs}_epochs"] = {
            **longer,
            "time_ratio_to_trl": round(theirs["loop_s"] / longer["loop_s"], 2),
            "accuracy_difference": round(longer["held_out_accuracy"] - theirs["held_out_accuracy"], 4),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "world-base"), help="backbone of both reward models")
    parser.add_argument("--rankings", type=int, default=240, help="training rankings per K")
    parser.add_argument("--valid", type=int, default=200, help="held-out rankings per K")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="independent draws of train and held-out rankings per K (repeat 0: seeds K, 1000 + K)",
    )
    parser.add_argument("--ks", default="4,9", help="comma-separated K values")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both trainers")
    parser.add_argument(
        "--rankings-per-step",
        type=int,
        default=4,
        help="ours: whole rankings per optimizer step (4, as in the world model's training "
        "recipe; 0: as many pairs per step as TRL's step, which at K = 9 is a single ranking, "
        "so each step sees one prompt)",
    )
    parser.add_argument("--pairs-per-step", type=int, default=32, help="TRL: pairs per optimizer step")
    parser.add_argument(
        "--extra-epochs",
        type=int,
        default=1,
        help="also train ours for this many epochs (time and accuracy beside TRL's one epoch; 1: skip)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine a 2-thread pool is often much slower)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run (40 rankings per K, 30 held out, 1 repeat)")
    parser.add_argument(
        "--skip-trl", action="store_true", help="compare our two losses only (no TRL needed); no speedups then"
    )
    args = parser.parse_args()
    if args.quick:
        args.rankings, args.valid, args.repeats = 40, 30, 1

    trl: Any = None
    try:
        import trl
    except ImportError:
        if not args.skip_trl:
            sys.exit(
                "reward_speed needs TRL, a benchmark-only dependency: .venv/bin/pip install trl (keep torch pinned)"
                " or --skip-trl"
            )
    import datasets
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    by_k = {}
    for k in [int(x) for x in args.ks.split(",")]:
        runs = [compare(k, repeat, args) for repeat in range(args.repeats)]
        by_k[str(k)] = {
            "runs": runs,
            "summary": {
                name: spread([pick(run) for run in runs])
                for name, pick in (
                    ("ours_accuracy", lambda run: run["ours"]["held_out_accuracy"]),
                    ("listwise_accuracy", lambda run: run["listwise"]["held_out_accuracy"]),
                    ("listwise_minus_pairwise", lambda run: run["listwise_minus_pairwise"]),
                    ("noise_ceiling", lambda run: run["noise_ceiling"]),
                    (
                        "listwise_speed_ratio",
                        lambda run: run["listwise"]["rankings_per_s"] / run["ours"]["rankings_per_s"],
                    ),
                    *(
                        ()
                        if args.skip_trl
                        else (
                            ("trl_accuracy", lambda run: run["trl"]["held_out_accuracy"]),
                            ("accuracy_difference", lambda run: run["accuracy_difference"]),
                            ("listwise_accuracy_difference", lambda run: run["listwise_accuracy_difference"]),
                            ("speedup", lambda run: run["speedup"]),
                            ("cpu_speedup", lambda run: run["cpu_speedup"]),
                        )
                    ),
                )
            },
        }
        print(f"K={k} summary: {by_k[str(k)]['summary']}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "reward_speed",
        "quick": args.quick,
        "model": Path(args.model).name,
        "threads": args.threads,
        "lr": args.lr,
        "pairs_per_step": args.pairs_per_step,
        "repeats": args.repeats,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__ if trl else None,
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "by_k": by_k,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
