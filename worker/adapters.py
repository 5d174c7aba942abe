"""The memory options every trainer shares: weight precision, gradient checkpointing and LoRA adapters (peft).

A trainer's config (app.training.configs.TrainerOptions) says how its model is held in memory:

- `precision`: the dtype of the weights. 'auto' keeps full fine-tuning in fp32 (accelerate's
  `mixed_precision` then autocasts the compute) and holds a LoRA run's frozen base in bf16 where the
  device has it; 'bf16' also trains full weights in bf16.
- `gradient_checkpointing`: activations are recomputed in the backward pass instead of kept.
- `lora_r` > 0: the weights are frozen and peft's LoRA adapters (rank r, scale α/r) are the only trainable
  weights, in fp32 whatever the base's dtype. With LoRA, AdamW keeps state for the adapters only, so a
  trainer's memory is about one copy of the weights plus activations.

With several adapters on one base (PPO: the policy's, the value network's, the reward model's), peft
runs one adapter at a time; `using_adapter` switches for the duration of a call and `AdapterView` is a
module that always runs its base that way, so the trainers' loops call a view like any other model.
Saved versions load with plain `AutoModelForCausalLM.from_pretrained`: `merged_state_dict` folds the
adapter into the weights on the way to disk, without a second copy of the model in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from app.training.configs import TrainerOptions

# The LoRA weights of a peft model: `...q_proj.lora_A.<adapter>.weight`.
LORA_MARK = "lora_"


def weights_dtype(config: TrainerOptions, device: torch.device | str) -> torch.dtype:
    """The dtype a trainer loads its weights in (see the module docstring)."""
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "auto" and config.lora_r and _has_bf16(device):
        return torch.bfloat16
    return torch.float32


def _has_bf16(device: torch.device | str) -> bool:
    return str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def lora_settings(config: TrainerOptions, task_type: str | None = "CAUSAL_LM") -> Any:
    """peft's LoraConfig from the trainer config (target modules: the config's, else peft's per architecture)."""
    from peft import LoraConfig

    targets: list[str] | str | None = None
    if config.lora_target_modules:
        names = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
        targets = "all-linear" if names == ["all-linear"] else names
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recomputes activations in the backward pass (non-reentrant, so frozen inputs need no grad hook)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def prepare_for_training(
    model: PreTrainedModel, config: TrainerOptions, adapter: str = "default", task_type: str | None = "CAUSAL_LM"
) -> PreTrainedModel:
    """Applies the config's memory options: gradient checkpointing, then LoRA (the base frozen) when lora_r > 0."""
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not config.lora_r:
        return model
    from peft import get_peft_model

    # peft keeps the adapters in fp32 (autocast_adapter_dtype) over a bf16 base.
    peft_model = get_peft_model(model, lora_settings(config, task_type), adapter_name=adapter)
    # The PeftModel forwards every attribute it lacks to the wrapped model, so callers use it as one.
    return cast(PreTrainedModel, peft_model)


def is_peft(model: Any) -> bool:
    """Whether the model is a peft model (adapters on a base)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft comes with the worker's extra; the web never trains
        return False
    return isinstance(model, PeftModel)


@contextmanager
def using_adapter(model: Any, adapter: str | None) -> Iterator[None]:
    """Runs the peft model with one adapter active (None: none, the frozen base) for the block.

    peft's set_adapter also freezes every other adapter; a trainer that trains two adapters on one base
    (PPO's policy and value) keeps both trainable, so their requires_grad flags are restored afterwards.
    """
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for n, p in model.named_parameters() if LORA_MARK in n]
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for param, flag in flags:
            param.requires_grad_(flag)


class AdapterView(nn.Module):
    """A module that runs `module` (a peft model, or a body inside one) with one adapter of `peft_model` active.

    PPO's reference is `AdapterView(policy, policy, None)`: the same weights with the adapter off.
    """

    peft_model: Any
    module: nn.Module

    def __init__(self, peft_model: Any, module: nn.Module, adapter: str | None) -> None:
        super().__init__()
        # Plain attributes, not submodules: the view owns no weights, so optimizers and state dicts skip it.
        self.__dict__["peft_model"] = peft_model
        self.__dict__["module"] = module
        self.adapter = adapter

    @property
    def config(self) -> Any:
        """The viewed model's config."""
        return self.module.config

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # the device is read from here
        return self.module.parameters(recurse)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with using_adapter(self.peft_model, self.adapter):
            return self.module(*args, **kwargs)


def adapter_parameters(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of one adapter of a peft model."""
    return [(n, p) for n, p in model.named_parameters() if LORA_MARK in n and f".{adapter}." in n]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a model (all of them in full fine-tuning, the adapters and heads with LoRA)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in model.state_dict().items() if n in trainable}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads what trainable_state wrote; raises if a trainable tensor of the model is missing from it."""
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict with the active adapter folded in, keyed as the plain model's.

    Only the adapted weights get a new tensor (W + ΔW); the rest are the base's own, so saving a LoRA
    model needs no second copy of it in memory (merge_and_unload on a copy would).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                layer: Any = module
                with torch.no_grad():
                    delta = layer.get_delta_weight(active[0])
                    for other in active[1:]:
                        delta = delta + layer.get_delta_weight(other)
                deltas[f"{name}.weight"] = delta
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if LORA_MARK in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state[plain] = (value + deltas[plain].to(value.dtype)) if plain in deltas else value
    return state
