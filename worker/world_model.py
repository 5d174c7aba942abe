"""Pretrains the bundled world's tiny base model, the loop's default starting policy.

No weights can be downloaded here, so the project makes its own "GPT-3": a
byte-level BPE tokenizer and a tiny Llama-style model trained on CPU on the
world corpus (plain text about the world, never questions and answers). The
result completes world text but does not follow instructions; the loop's SFT,
reward model and PPO stages take it from there. `pretrain_base` saves it with
`save_model`, so every later stage loads it with `load_model` like any other
Hugging Face model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerFast

from app.world.corpus import corpus
from worker.modeling import count_parameters, prepare_tokenizer, save_model, save_recipe, tiny_causal_lm

EOS_TOKEN = "<|endoftext|>"  # noqa: S105  a vocabulary token, not a password
PAD_TOKEN = "<pad>"  # noqa: S105  a vocabulary token, not a password

# The trainer settings measured for this model by bench/learning.py (bench/RESULTS.md, "learning"), saved
# beside it. The worker applies them to runs descended from it where a run's params leave a setting out: the
# trainers' defaults are InstructGPT's, for models thousands of times larger, and teach this one almost nothing.
WORLD_RECIPE: dict[str, Any] = {
    "about": "Trainer settings measured for this model by bench/learning.py (bench/RESULTS.md, 'learning'). The "
    "worker uses them for runs of models descended from this base wherever a run's own params leave a setting out.",
    "sft": {
        "epochs": 6,
        "learning_rate": 1e-3,
        "batch_size": 16,
        "micro_batch_size": 16,
        "warmup_ratio": 0.05,
        "max_length": 128,
    },
    "rm": {
        "epochs": 2,
        "learning_rate": 3e-4,
        "rankings_per_step": 4,
        "rankings_per_micro_batch": 4,
        "warmup_ratio": 0.05,
        "max_length": 128,
    },
    "ppo": {
        "steps": 30,
        "rollout_batch_size": 32,
        "minibatch_size": 8,
        "micro_batch_size": 8,
        "ppo_epochs": 4,
        "learning_rate": 3e-5,
        "value_learning_rate": 1e-3,
        "lr_schedule": "constant",
        "kl_coef": 0.1,
        "max_new_tokens": 24,
    },
}

# Greedy continuations logged after pretraining, to see it learnt the world.
SAMPLE_PREFIXES = (
    "The mayor of Brindle is",
    "The river in Harrowgate runs",
    "The market ledger of Quillon reads: 12 + 30 =",
    "Written backwards, lantern becomes",
    "What is 17 + 25?\n\nAnswer:",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (digits split one by one) with EOS/BOS and pad tokens."""
    tokenizer = Tokenizer(models.BPE())
    # Single digits make sums learnable: 42 and 142 share their last digit's token.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=512,
    )
    return prepare_tokenizer(fast)


def _token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    # Documents are packed end to end, each closed by EOS, as in GPT pretraining;
    # the EOS teaches the model where a piece of text ends.
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def _greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prefix: str, max_new_tokens: int = 20) -> str:
    enc = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        # Causal LMs mix in GenerationMixin; transformers 5 no longer declares `generate` on PreTrainedModel.
        out = cast(GenerationMixin, model).generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    # decode of one row of ids gives one text; transformers types the batch form alongside.
    return cast(str, tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def pretrain_base(
    out_dir: str | Path,
    *,
    steps: int = 4000,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 32,
    block_size: int = 64,
    lr: float = 3e-3,
    n_docs: int = 80_000,
    vocab_size: int = 512,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Trains tokenizer and tiny base model on the world corpus (CPU) and saves them to out_dir."""
    from tqdm.auto import tqdm

    if threads:
        # A model this small gains little from more threads, and on a shared
        # 2-core machine an oversubscribed thread pool runs ~30x slower. The
        # setting is process-wide, so it is restored for the caller after.
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return pretrain_base(
                out_dir,
                steps=steps,
                seed=seed,
                progress=progress,
                batch_size=batch_size,
                block_size=block_size,
                lr=lr,
                n_docs=n_docs,
                vocab_size=vocab_size,
                threads=None,
            )
        finally:
            torch.set_num_threads(previous)
    started = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    docs = list(corpus(n_docs, seed))
    tokenizer = train_tokenizer(docs, vocab_size=vocab_size)
    stream = _token_stream(tokenizer, docs)
    held_out = _token_stream(tokenizer, list(corpus(500, seed + 1)))
    model = tiny_causal_lm(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    generator = torch.Generator().manual_seed(seed)

    def batch(tokens: torch.Tensor, rng: torch.Generator = generator) -> torch.Tensor:
        starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=rng)
        return torch.stack([tokens[s : s + block_size] for s in starts])

    def lr_at(step: int) -> float:
        # Linear warmup then cosine decay to a tenth, as in nanoGPT.
        if step < warmup:
            return lr * (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

    def held_out_loss() -> float:
        # The same four held-out batches every time, so losses compare.
        rng = torch.Generator().manual_seed(seed + 1)
        model.eval()
        with torch.inference_mode():
            losses = [model(input_ids=x, labels=x).loss.item() for x in (batch(held_out, rng) for _ in range(4))]
        model.train()
        return sum(losses) / len(losses)

    initial_loss = held_out_loss()
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pretrain world base", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x = batch(stream)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - started
    model.eval()
    final_loss = held_out_loss()
    samples = {p: _greedy(model, tokenizer, p) for p in SAMPLE_PREFIXES}
    path = save_model(model, tokenizer, out_dir)
    save_recipe(path, WORLD_RECIPE)
    return {
        "path": str(path),
        "steps": steps,
        "seed": seed,
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "corpus_tokens": len(stream),
        "tokens_seen": steps * batch_size * block_size,
        "initial_held_out_loss": round(initial_loss, 4),
        "final_held_out_loss": round(final_loss, 4),
        "final_train_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "seconds": round(train_seconds, 1),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m worker.world_model OUT_DIR [--steps N] [--seed S]."""
    parser = argparse.ArgumentParser(description="Pretrain the bundled world's tiny base model on CPU.")
    parser.add_argument("out_dir", help="directory to save the model and tokenizer in")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: pretrain_base's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kwargs = {"steps": args.steps} if args.steps else {}
    print(json.dumps(pretrain_base(args.out_dir, seed=args.seed, **kwargs), indent=1))  # noqa: T201  command-line output


if __name__ == "__main__":
    main()
