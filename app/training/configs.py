"""The settings of every trainer, in one torch-free module that the web and the worker both import.

A training run's `params` are the fields of its trainer's config dataclass: SFT (worker/train_sft.py),
the reward model (worker/train_rm.py), PPO (worker/train_ppo.py) and the bundled world's pretraining
(worker/world_model.py). The worker builds its config from here; the web lists the same fields with
their help and allowed range (GET /api/v1/runs/params, the runs page) and refuses a run whose params
name an unknown setting, have the wrong type or leave the range, naming the field, before anything is
queued. Each field's metadata carries `help` and, where a value would break the trainer, its limits:
`min`/`max` (inclusive), `gt` (exclusive lower bound) or `choices`. Defaults and names are those the
checkpoints, the shipped training recipe and the benchmarks were written with: do not change them.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from app.errors import FieldError

# Limits shared by many fields. Steps, epochs and sizes of 0 divide by zero or loop forever; a learning rate
# of 0 trains nothing; seeds are numpy's unsigned 32-bit ones.
AT_LEAST_1: dict[str, Any] = {"min": 1}
POSITIVE: dict[str, Any] = {"gt": 0}
NON_NEGATIVE: dict[str, Any] = {"min": 0}
RATIO: dict[str, Any] = {"min": 0, "max": 1}
SEED: dict[str, Any] = {"min": 0, "max": 2**32 - 1}
# Fitting a pair to max_length keeps at least one prompt and one completion token only from 2 up.
LENGTH: dict[str, Any] = {"min": 2}
DEVICES: dict[str, Any] = {"choices": ("cpu",)}  # any other device is accelerate's choice, which None already says
PRECISIONS: dict[str, Any] = {"choices": ("no", "bf16", "fp16")}
LR_SCHEDULE_NAMES = ("constant", "cosine")  # the keys of worker/train_ppo.py's LR_SCHEDULES
WEIGHT_PRECISIONS: dict[str, Any] = {"choices": ("auto", "fp32", "bf16")}
LORA_SAVE: dict[str, Any] = {"choices": ("merged", "adapter")}
RM_LOSSES: dict[str, Any] = {"choices": ("pairwise", "listwise")}  # worker/train_rm.py's RANKING_LOSSES


@dataclass
class TrainerOptions:
    """Where and how big a trainer runs: device, precision and the memory options every trainer takes.

    With `lora_r` > 0 the model's weights stay frozen and only LoRA adapters (peft) train; PPO then keeps
    one frozen base for the policy and its reference (the same base with the adapter off), and the value
    network is an adapter on the reward model's base (see worker/ppo_models.py).
    """

    device: str | None = field(
        default=None, metadata={"help": "'cpu' forces CPU; None lets accelerate choose.", **DEVICES}
    )
    mixed_precision: str = field(
        default="no",
        metadata={"help": "accelerate mixed precision: 'no', 'bf16' or 'fp16' (weights stay fp32).", **PRECISIONS},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "dtype of the weights: 'auto' is bf16 for a LoRA run's frozen base where the device has bf16 "
            "(a GPU), fp32 otherwise; 'bf16' also trains full weights in bf16 (half the memory, less exact).",
            **WEIGHT_PRECISIONS,
        },
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank; 0 trains every weight (full fine-tuning).", **NON_NEGATIVE}
    )
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling α (the update is scaled by α / r).", **AT_LEAST_1}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input.", **RATIO})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names that get adapters, or 'all-linear'; None: peft's default for "
            "the architecture (q_proj,v_proj for Llama, Qwen2, Mistral; c_attn for GPT-2)."
        },
    )
    lora_save: str = field(
        default="merged",
        metadata={
            "help": "With LoRA, save the adapter merged into the weights (loads with plain from_pretrained) or the "
            "adapter alone (peft loads it on its base; a reward model saved so shares PPO's base).",
            **LORA_SAVE,
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, ~30% slower."}
    )


@dataclass
class PretrainConfig:
    """Settings of one pretraining run of the bundled world's base model."""

    steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps (default: the world model's own).", **AT_LEAST_1}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order.", **SEED})


@dataclass
class SFTConfig(TrainerOptions):
    """Settings of one supervised fine-tuning run."""

    epochs: int = field(default=3, metadata={"help": "Passes over the demonstrations (InstructGPT: 16).", **AT_LEAST_1})
    learning_rate: float = field(
        default=2e-5, metadata={"help": "Peak AdamW learning rate; ~1e-3 suits the tiny world model.", **POSITIVE}
    )
    batch_size: int = field(default=8, metadata={"help": "Demonstrations per optimizer step.", **AT_LEAST_1})
    micro_batch_size: int = field(
        default=8,
        metadata={"help": "Demonstrations per forward pass (gradient accumulation when smaller).", **AT_LEAST_1},
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay on weight matrices.", **NON_NEGATIVE}
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Fraction of steps of linear warmup before cosine decay.", **RATIO}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables).", **NON_NEGATIVE})
    max_length: int = field(
        default=1024, metadata={"help": "Tokens per example; longer pairs are truncated.", **LENGTH}
    )
    early_stopping_patience: int | None = field(
        default=2,
        metadata={"help": "Stop after this many epochs without a better validation loss (None: never).", **AT_LEAST_1},
    )
    seed: int = field(default=0, metadata={"help": "Seed for shuffling, dropout and initialisation.", **SEED})
    checkpoint_every: int = field(
        default=100,
        metadata={"help": "Write a checkpoint every N optimizer steps (and at every epoch end).", **AT_LEAST_1},
    )
    eval_batch_size: int = field(
        default=16, metadata={"help": "Examples per forward pass when validating.", **AT_LEAST_1}
    )


@dataclass
class RMConfig(TrainerOptions):
    """Settings of one reward-model training run."""

    epochs: int = field(
        default=1,
        metadata={
            "help": "Passes over the rankings (InstructGPT: 1, more overfit; the tiny world model peaks at 2).",
            **AT_LEAST_1,
        },
    )
    learning_rate: float = field(
        default=9e-6, metadata={"help": "Peak AdamW learning rate (InstructGPT 6B RM: 9e-6).", **POSITIVE}
    )
    rankings_per_step: int = field(
        default=8, metadata={"help": "Rankings per optimizer step (InstructGPT: 64).", **AT_LEAST_1}
    )
    rankings_per_micro_batch: int = field(
        default=8,
        metadata={
            "help": "Whole rankings per forward pass; all K completions of a ranking share one pass.",
            **AT_LEAST_1,
        },
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay on weight matrices.", **NON_NEGATIVE}
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Fraction of steps of linear warmup before cosine decay.", **RATIO}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables).", **NON_NEGATIVE})
    max_length: int = field(
        default=1024, metadata={"help": "Tokens per (prompt, completion); longer ones are truncated.", **LENGTH}
    )
    loss: str = field(
        default="pairwise",
        metadata={
            "help": "'pairwise': InstructGPT's mean -log σ(r_w − r_l) over a ranking's pairs; 'listwise': the "
            "Plackett–Luce likelihood of the whole ranking, ties by Efron's method.",
            **RM_LOSSES,
        },
    )
    score_l2: float = field(
        default=0.0,
        metadata={"help": "Coefficient of a small L2 penalty on scores, keeping them near 0.", **NON_NEGATIVE},
    )
    seed: int = field(default=0, metadata={"help": "Seed for shuffling and the head's initialisation.", **SEED})
    checkpoint_every: int = field(
        default=100, metadata={"help": "Write a checkpoint every N optimizer steps.", **AT_LEAST_1}
    )
    eval_batch_size: int = field(
        default=16, metadata={"help": "Rankings per forward pass when evaluating.", **AT_LEAST_1}
    )


@dataclass
class PPOConfig(TrainerOptions):
    """Settings of one PPO run."""

    steps: int = field(
        default=100, metadata={"help": "PPO steps; each is one rollout batch and its optimisation.", **AT_LEAST_1}
    )
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts sampled per PPO step.", **AT_LEAST_1})
    minibatch_size: int = field(default=4, metadata={"help": "Rollouts per optimizer step.", **AT_LEAST_1})
    micro_batch_size: int = field(
        default=4, metadata={"help": "Rollouts per forward pass (gradient accumulation).", **AT_LEAST_1}
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch.", **AT_LEAST_1})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate of the policy.", **POSITIVE})
    value_learning_rate: float = field(
        default=1e-5, metadata={"help": "Peak AdamW learning rate of the value network.", **POSITIVE}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay on weight matrices.", **NON_NEGATIVE}
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Fraction of optimizer steps of linear warmup before lr_schedule applies.", **RATIO},
    )
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "'cosine': decays to 0 by the last step (early stopping at a small β); 'constant': every "
            "PPO step learns at the peak rate (pair it with a larger kl_coef).",
            "choices": LR_SCHEDULE_NAMES,
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm, per network (0 disables).", **NON_NEGATIVE}
    )
    kl_coef: float = field(
        default=0.02,
        metadata={"help": "β: weight of the per-token KL to the SFT policy (InstructGPT: 0.02).", **NON_NEGATIVE},
    )
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt β towards kl_target (Ziegler et al. 2019)."})
    # The controller divides by the target and the horizon.
    kl_target: float = field(
        default=6.0, metadata={"help": "Target KL (nats per completion) of the adaptive controller.", **POSITIVE}
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "Horizon (rollouts) of the adaptive KL controller.", **AT_LEAST_1}
    )
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ.", **RATIO})
    lam: float = field(default=0.95, metadata={"help": "GAE λ.", **RATIO})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy probability ratio.", **POSITIVE})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip range of value predictions around the rollout's values.", **POSITIVE}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled completion, in tokens.", **AT_LEAST_1})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0); log-probs use the same scaling.", **POSITIVE}
    )
    stop_at_newline: bool | None = field(
        default=None,
        metadata={"help": "End completions at their first newline, as the sampler does (None: when no chat template)."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Score subtracted from completions cut at max_new_tokens without stopping (None: none).",
            **NON_NEGATIVE,
        },
    )
    # Prompts keep their last max_prompt_length tokens; 0 would keep them whole (a slice from -0).
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompt tokens kept (from the end) before sampling.", **AT_LEAST_1}
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={"help": "γ of PPO-ptx: weight of the SFT loss on ptx_examples (0: off).", **NON_NEGATIVE},
    )
    ptx_batch_size: int = field(default=4, metadata={"help": "ptx examples per optimizer step.", **AT_LEAST_1})
    eval_batch_size: int = field(
        default=16, metadata={"help": "Prompts per generate call when evaluating.", **AT_LEAST_1}
    )
    eval_size: int = field(
        default=64,
        metadata={"help": "Training prompts used for evaluation when no eval_prompts are given.", **AT_LEAST_1},
    )
    seed: int = field(default=0, metadata={"help": "Seed for prompt order, sampling and minibatch shuffling.", **SEED})
    checkpoint_every: int = field(default=10, metadata={"help": "Write a checkpoint every N PPO steps.", **AT_LEAST_1})


@dataclass
class DPOConfig(TrainerOptions):
    """Settings of one DPO run on whole rankings (worker/train_dpo.py)."""

    beta: float = field(
        default=0.1, metadata={"help": "β: scale of the implicit reward β·(log π − log π_ref) (DPO: 0.1).", **POSITIVE}
    )
    loss: str = field(
        default="pairwise",
        metadata={
            "help": "'pairwise': DPO's −log σ over every non-tied pair of a ranking; 'listwise': the Plackett–Luce "
            "likelihood of the whole ranking on the implicit rewards, ties by Efron's method.",
            **RM_LOSSES,
        },
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the rankings.", **AT_LEAST_1})
    learning_rate: float = field(default=5e-7, metadata={"help": "Peak AdamW learning rate.", **POSITIVE})
    rankings_per_step: int = field(default=8, metadata={"help": "Rankings per optimizer step.", **AT_LEAST_1})
    rankings_per_micro_batch: int = field(
        default=4,
        metadata={"help": "Whole rankings per forward pass; all K completions of a ranking share it.", **AT_LEAST_1},
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay on weight matrices.", **NON_NEGATIVE}
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of steps of linear warmup before cosine decay.", **RATIO}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables).", **NON_NEGATIVE})
    max_length: int = field(
        default=1024, metadata={"help": "Tokens per (prompt, completion); longer ones are truncated.", **LENGTH}
    )
    seed: int = field(default=0, metadata={"help": "Seed for shuffling and dropout.", **SEED})
    checkpoint_every: int = field(
        default=100, metadata={"help": "Write a checkpoint every N optimizer steps.", **AT_LEAST_1}
    )
    eval_batch_size: int = field(
        default=8, metadata={"help": "Rankings per forward pass when evaluating.", **AT_LEAST_1}
    )


CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
}
"""The config dataclass of each run kind that takes params (sampling runs take theirs from the batch)."""


# --- validation ------------------------------------------------------------------------------------------------


def _types(cls: type, f: Field) -> tuple[type, ...]:
    hint = typing.get_type_hints(cls)[f.name]
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def allowed(cls: type, f: Field) -> str:
    """Says in words what a field accepts, e.g. "an integer >= 1 or null"."""
    kinds = _types(cls, f)
    meta = f.metadata
    if "choices" in meta:
        text = "one of " + ", ".join(_number(choice) for choice in meta["choices"])
    elif bool in kinds:
        text = "true, false" if type(None) in kinds else "true or false"
    elif str in kinds:
        text = "a string"
    else:
        text = "an integer" if int in kinds else "a number"
        low, high = meta.get("min"), meta.get("max")
        if low is not None and high is not None:
            text += f" between {_number(low)} and {_number(high)}"
        elif "gt" in meta:
            text += f" > {_number(meta['gt'])}"
        elif low is not None:
            text += f" >= {_number(low)}"
        elif high is not None:
            text += f" <= {_number(high)}"
    return text + (" or null" if type(None) in kinds else "")


def _fits(value: Any, kinds: tuple[type, ...], meta: Any) -> tuple[bool, Any]:
    """(whether value has one of the types and is within the limits, value as the config stores it)."""
    if value is None:
        return type(None) in kinds, None
    if "choices" in meta:
        return value in meta["choices"] and type(value) in kinds, value
    if isinstance(value, bool) or bool in kinds:
        return isinstance(value, bool) and bool in kinds, value
    if isinstance(value, str) or str in kinds:
        return isinstance(value, str) and str in kinds, value
    if isinstance(value, int) and int in kinds:
        number: float | int = value
    elif isinstance(value, (int, float)) and float in kinds and math.isfinite(value):
        number = float(value)  # JSON's 1 for a float setting is 1.0
    else:
        return False, value
    low, high, above = meta.get("min"), meta.get("max"), meta.get("gt")
    within = (low is None or number >= low) and (high is None or number <= high) and (above is None or number > above)
    return within, number


def ordered_fields(cls: type) -> list[Field]:
    """A config's fields, the trainer's own settings first, then the options every trainer shares."""
    shared = {f.name for f in fields(TrainerOptions)}
    return sorted(fields(cls), key=lambda f: f.name in shared)


def validate_params(kind: str, params: Any, *, ignore_unknown: bool = False) -> dict[str, Any]:
    """Checks a run's params against its trainer's config and returns them as the config takes them.

    Raises FieldError (422) naming the first bad setting, e.g. `params.learning_rate: must be a number > 0,
    got 0`. With ignore_unknown, settings the config does not have are dropped instead: the worker reads
    params stored by older versions and recipes shipped beside older models.
    """
    cls = CONFIGS.get(kind)
    if cls is None:
        raise FieldError("kind", f"must be one of {', '.join(CONFIGS)} to take params, not {kind!r}")
    if not isinstance(params, dict):
        raise FieldError("params", 'must be a JSON object such as {"epochs": 2}')
    known = {f.name: f for f in ordered_fields(cls)}
    checked: dict[str, Any] = {}
    for name, value in params.items():
        f = known.get(name)
        if f is None:
            if ignore_unknown:
                continue
            raise FieldError(f"params.{name}", f"{kind} has no such setting; known: {', '.join(known)}")
        ok, checked[name] = _fits(value, _types(cls, f), f.metadata)
        if not ok:
            raise FieldError(f"params.{name}", f"must be {allowed(cls, f)}, got {json.dumps(value, default=str)}")
    return checked


def config_for(kind: str, params: dict[str, Any]) -> Any:
    """The config dataclass of a run of `kind` from its params (unknown ones dropped, the rest validated)."""
    return CONFIGS[kind](**validate_params(kind, params, ignore_unknown=True))


def param_specs(kind: str) -> dict[str, dict[str, Any]]:
    """The settings a run of `kind` accepts: type, default, help, limits and `allowed` in words, by name."""
    cls = CONFIGS.get(kind)
    if cls is None:
        return {}
    specs = {}
    for f in ordered_fields(cls):
        limits = {key: list(v) if key == "choices" else v for key, v in f.metadata.items() if key != "help"}
        specs[f.name] = {
            "type": str(f.type),
            "default": None if f.default is MISSING else f.default,
            "help": f.metadata.get("help", ""),
            "allowed": allowed(cls, f),
            **limits,
        }
    return specs
