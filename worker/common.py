"""Training plumbing shared by the three trainers (SFT, reward model, PPO).

The trainers in worker/train_sft.py, worker/train_rm.py and worker/train_ppo.py
each own their loop; this module holds only what all of them need in the same
form: seeding and RNG capture, the `accelerate` handle that places models on
the right device, full-state checkpoints that are written atomically and
refused when they belong to another run, the AdamW + warmup/cosine schedule,
deterministic shuffled batches, and the one tokenisation of (prompt,
completion) pairs so that SFT, the reward model, PPO and sampling all see the
same token sequences.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from app.conversations import PromptInput
from worker.modeling import adds_special_tokens, format_completion, format_prompt

Progress = Callable[[int, int, dict[str, float]], None]
"""Called as progress(step, total_steps, metrics) on the main process; may raise to stop the run."""

CHECKPOINT_NAME = "checkpoint.pt"
# Fields that may change between a killed run and its resumption without
# changing what the run computes.
OPERATIONAL_FIELDS = frozenset({"checkpoint_every", "device"})


# ----------------------------------------------------------------- devices, seeds


def return_freed_memory() -> None:
    """Makes glibc give large freed blocks back to the OS at once (a fixed mmap threshold of 128 KiB).

    glibc raises its mmap threshold each time a large block is freed, after which blocks of that size come
    from the heap and stay in the process when freed: a trainer's activations, freed after every backward
    pass, then pile up as resident memory the next phase cannot always reuse. Measured on LoRA PPO of a
    60 M-parameter Llama on CPU: a peak of 9.6 bytes per parameter with glibc's default, 5.9 with this
    (bench/memory.py). Fixing the threshold turns the adjustment off; no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl)
        return
    m_mmap_threshold = -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 128 * 1024)


def make_accelerator(device: str | None = None, mixed_precision: str = "no") -> Accelerator:
    """Returns the accelerate handle: the given device ("cpu" forces CPU), else what accelerate finds.

    Every trainer starts here, so this is also where the process stops hoarding freed activations
    (return_freed_memory).
    """
    return_freed_memory()
    # Under `accelerate launch` every process gets one GPU; in a Celery worker it
    # is a single process on the first visible GPU, or the CPU. accelerate keeps
    # one process-wide state and refuses different settings later, but a worker
    # runs many trainers with different settings: outside a distributed launch
    # (whose process group must stay), start each trainer from a clean state.
    if not (PartialState._shared_state and PartialState().use_distributed):
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=(device == "cpu"), mixed_precision=mixed_precision)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    set_seed(seed)


def rng_state() -> dict[str, Any]:
    """Captures every RNG a training step draws from, so a resumed run draws the same numbers."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the RNGs captured by rng_state()."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets every dropout probability to 0 (reward and PPO training, as in TRL)."""
    # With dropout, the log-probabilities PPO compares across epochs and the
    # scores the ranking loss compares within a ranking would be noisy.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ------------------------------------------------------------------ checkpoints


def replace_directory(tmp: Path, target: Path) -> Path:
    """Moves a fully written temp directory onto target, so readers never see a half-written one."""
    if target.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-able training data, stored in checkpoints to refuse foreign resumes."""
    blob = json.dumps(data, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(checkpoint_dir: str | Path, state: dict[str, Any]) -> Path:
    """Writes the full training state to checkpoint_dir/checkpoint.pt atomically (temp file, then rename)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{uuid.uuid4().hex[:8]}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(checkpoint_dir: str | Path | None, config: Any, data_fingerprint: str) -> dict[str, Any] | None:
    """Loads checkpoint_dir/checkpoint.pt if present; raises if it was written by a different run."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # The file holds optimizer and RNG state besides tensors; it is our own
    # file in our own checkpoint directory, so full unpickling is acceptable.
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved, current = dict(state["config"]), asdict(config)
    # A setting added since the checkpoint was written had its default then.
    defaults = {f.name: f.default for f in fields(config)}
    changed = sorted(
        name for name in current if name not in OPERATIONAL_FIELDS and saved.get(name, defaults[name]) != current[name]
    )
    if changed:
        raise ValueError(f"checkpoint in {checkpoint_dir} was written with other settings: {changed}")
    if state["data_fingerprint"] != data_fingerprint:
        raise ValueError(f"checkpoint in {checkpoint_dir} was written for other training data")
    return state


# ------------------------------------------------------------ optimisation


def adamw(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Param groups for AdamW: weight decay on matrices only, not on biases, norms or scalars (as nanoGPT)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr})
    return groups


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then cosine decay to zero."""
    warmup = round(warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices 0..n-1 shuffled by (seed, epoch) and cut into batches; the same on every resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Cuts one optimizer step's indices into micro-batches for gradient accumulation."""
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


# ----------------------------------------------------------- tokenisation


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: PromptInput) -> list[int]:
    """Token ids of format_prompt(prompt): what every model of the loop sees before a completion."""
    text = format_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer))["input_ids"]


def encode_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of format_completion(completion), always ending with the EOS id."""
    text = format_completion(tokenizer, completion)
    eos = tokenizer.eos_token or ""
    # Append the EOS id ourselves: a tokenizer that does not treat the EOS
    # string as special would otherwise split it into ordinary pieces.
    if eos and text.endswith(eos):
        text = text[: -len(eos)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def fit_to_length(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncates a pair to max_length: the prompt from the left (keeping its end), then the completion."""
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    # The end of the prompt (the question and the answer marker) matters most;
    # give it at least half the budget so a long completion cannot erase it.
    prompt_budget = max(max_length - len(completion_ids), max_length // 2)
    prompt_ids = prompt_ids[-prompt_budget:]
    return prompt_ids, completion_ids[: max_length - len(prompt_ids)]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: PromptInput, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids with EOS) for one pair, fitted to max_length."""
    return fit_to_length(encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion), max_length)


def pad_right(sequences: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads id lists into (ids, attention_mask); `fill` replaces pad_id in ids (e.g. -100 for labels)."""
    width = max(len(s) for s in sequences)
    value = pad_id if fill is None else fill
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate` does, so left padding does not shift them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)
