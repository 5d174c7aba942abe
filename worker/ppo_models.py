"""The four networks of PPO (policy, reference, value, reward) and how they share weights.

InstructGPT's PPO holds a trained policy, its frozen SFT reference, a trained value network initialised
from the reward model, and the frozen reward model. With full fine-tuning (`lora_r` = 0) these are four
copies of the weights, as in the paper. With LoRA they are adapters (peft) on at most two frozen bases:

    base of the policy (the SFT model)       policy = adapter "default"; reference = the base, adapter off
    base of the reward model (often the same) reward = the base with the reward model's adapter, or the
                                              reward model itself; value = adapter "value" + head, both
                                              initialised from the reward model (InstructGPT)

When the reward model was saved as an adapter on the policy's base (RMConfig lora_save='adapter' on the
SFT model, as the loop trains it), everything runs on one base: about one copy of the weights in memory.
A Python reward_fn (the bundled world's true scorer) has no network: the value is then an adapter on the
policy's base with a zero-initialised head.

The trainer calls these networks alike (`AdapterView` switches the active adapter per call) and trains
`policy_params` and `value_params` only; `value_scope` is the adapter context the value's forward *and*
backward must run in (gradient checkpointing recomputes the forward during backward, with whatever
adapter is active then).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.training.configs import PPOConfig
from worker.adapters import (
    AdapterView,
    adapter_parameters,
    enable_gradient_checkpointing,
    lora_settings,
    prepare_for_training,
    using_adapter,
)
from worker.adapters import weights_dtype as dtype_for_config
from worker.common import disable_dropout
from worker.modeling import load_model, prepare_tokenizer
from worker.train_rm import HEAD_FILE, META_FILE, RewardModel, load_reward_model, score_completions

# Prompts are texts, or conversations for multi-turn prompts (the bundled world's scorer only sees texts).
RewardFn = Callable[[list[Any], list[str]], list[float]]
"""reward_fn(prompts, completions) -> one score per completion (e.g. the bundled world's true scorer)."""

Params = list[tuple[str, nn.Parameter]]


@dataclass
class PPOModels:
    """What train_ppo trains and reads; see the module docstring for who shares what."""

    policy: PreTrainedModel
    reference: nn.Module
    value: RewardModel
    scorer: RewardFn
    tokenizer: PreTrainedTokenizerBase
    policy_params: Params
    value_params: Params
    value_scope: Callable[[], AbstractContextManager[Any]]
    frozen_bases: int  # copies of the weights held besides the trained ones (0 in full fine-tuning)


def _rm_head(reward: str | Path, device: torch.device | str) -> tuple[nn.Linear, dict[str, Any]]:
    meta = json.loads((Path(reward) / META_FILE).read_text())
    state = load_file(Path(reward) / HEAD_FILE)
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head.to(device), meta


def _value_head_from(head: nn.Linear, offset: float) -> nn.Linear:
    # Values are read from the raw head: fold the normalisation offset into its bias so they start on the
    # scale of the normalised reward.
    value = nn.Linear(head.in_features, 1).to(head.weight.device)
    with torch.no_grad():
        value.weight.copy_(head.weight)
        value.bias.copy_(head.bias - offset)
    return value


def _frozen_scorer(rm: RewardModel, tokenizer: PreTrainedTokenizerBase) -> RewardFn:
    rm.requires_grad_(False)
    return lambda prompts, texts: score_completions(rm, tokenizer, prompts, texts)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _load_adapter_on(peft_model: Any, adapter_dir: Path, name: str, trainable: bool) -> None:
    """Adds a reward model's adapter, saved on the body of a causal LM, to a peft causal LM of the same base."""
    from peft import PeftConfig, load_peft_weights, set_peft_model_state_dict

    adapter_config = PeftConfig.from_pretrained(str(adapter_dir))
    adapter_config.task_type = "CAUSAL_LM"
    adapter_config.inference_mode = not trainable
    peft_model.add_adapter(name, adapter_config)
    # Saved from the body, its keys lack the causal LM's body prefix (`model.` for Llama, `transformer.` for GPT-2).
    prefix = cast(PreTrainedModel, peft_model.get_base_model()).base_model_prefix
    weights = {
        key.replace("base_model.model.", f"base_model.model.{prefix}.", 1): value
        for key, value in load_peft_weights(str(adapter_dir), device="cpu").items()
    }
    result: Any = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing:
        raise ValueError(f"the reward model's adapter in {adapter_dir} does not fit the policy: {missing[0]} missing")
    for _, param in adapter_parameters(peft_model, name):
        param.requires_grad_(trainable)


def build_ppo_models(
    policy_path: str | Path, reward: str | Path | RewardFn, config: PPOConfig, device: torch.device | str
) -> PPOModels:
    """Loads the policy, reference, value network and reward for PPO as the config's memory options say."""
    dtype = dtype_for_config(config, device)
    if not config.lora_r:
        return _full_copies(policy_path, reward, config, device, dtype)

    base, tokenizer = load_model(policy_path, str(device), dtype)
    policy: Any = prepare_for_training(base, config, adapter="default")
    reference = AdapterView(policy, policy, None)
    body = cast(PreTrainedModel, policy.get_base_model()).base_model
    policy_params = adapter_parameters(policy, "default")
    frozen_bases = 1

    if callable(reward):
        scorer = reward
        policy.add_adapter("value", lora_settings(config))
        value = RewardModel(AdapterView(policy, body, "value"))
        nn.init.zeros_(value.head.weight)
        value_host = policy
    else:
        head, meta = _rm_head(reward, device)
        if meta.get("adapter_base") and _same_path(meta["adapter_base"], policy_path):
            # The reward model is an adapter on this very base: one frozen copy serves all four networks.
            _load_adapter_on(policy, Path(reward) / "backbone", "reward", trainable=False)
            rm = RewardModel(AdapterView(policy, body, "reward"), meta["reward_offset"], meta["max_length"])
            rm.head = head
            scorer = _frozen_scorer(rm, reward_tokenizer(reward))
            _load_adapter_on(policy, Path(reward) / "backbone", "value", trainable=True)
            value = RewardModel(AdapterView(policy, body, "value"))
            value_host = policy
        else:
            # A separate reward model: its frozen body is the value network's base too.
            rm_body: Any = prepare_for_training(
                cast(PreTrainedModel, RewardModel.load(reward, device, dtype).backbone),
                config,
                adapter="value",
                task_type=None,
            )
            # Trained through the value adapter: in training mode (gradient checkpointing acts only then),
            # without dropout, so its scores stay deterministic.
            disable_dropout(rm_body.train())
            rm = RewardModel(AdapterView(rm_body, rm_body, None), meta["reward_offset"], meta["max_length"])
            rm.head = head
            scorer = _frozen_scorer(rm, reward_tokenizer(reward))
            value = RewardModel(AdapterView(rm_body, rm_body, "value"))
            value_host = rm_body
            frozen_bases = 2
        value.head = _value_head_from(head, meta["reward_offset"])
    value.to(device)
    for _, param in adapter_parameters(value_host, "value"):
        param.requires_grad_(True)  # peft adds an adapter frozen while another one is active
    value_params = adapter_parameters(value_host, "value")
    value_params += [(f"head.{name}", param) for name, param in value.head.named_parameters()]
    return PPOModels(
        policy=cast(PreTrainedModel, policy),
        reference=reference,
        value=value,
        scorer=scorer,
        tokenizer=tokenizer,
        policy_params=policy_params,
        value_params=value_params,
        value_scope=lambda: using_adapter(value_host, "value"),
        frozen_bases=frozen_bases,
    )


def reward_tokenizer(reward: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a reward model."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(reward)))


def _full_copies(
    policy_path: str | Path,
    reward: str | Path | RewardFn,
    config: PPOConfig,
    device: torch.device | str,
    dtype: torch.dtype,
) -> PPOModels:
    """InstructGPT's four copies: a trained policy and value network, a frozen reference and reward model."""
    policy, tokenizer = load_model(policy_path, str(device), dtype)
    policy = prepare_for_training(policy, config)
    reference, _ = load_model(policy_path, str(device), dtype)
    reference.eval().requires_grad_(False)
    if callable(reward):
        scorer = reward
        value = RewardModel.from_causal_lm(load_model(policy_path, str(device), dtype)[0]).to(device)
        torch.nn.init.zeros_(value.head.weight)
    else:
        rm, rm_tokenizer = load_reward_model(reward, device)
        scorer = _frozen_scorer(rm, rm_tokenizer)
        value = RewardModel.load(reward, device, dtype)
        value.head = _value_head_from(value.head, value.reward_offset)
        value.reward_offset = 0.0
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(cast(PreTrainedModel, value.backbone))
    return PPOModels(
        policy=policy,
        reference=reference,
        value=value,
        scorer=scorer,
        tokenizer=tokenizer,
        policy_params=list(policy.named_parameters()),
        value_params=list(value.named_parameters()),
        value_scope=contextlib.nullcontext,
        frozen_bases=2,
    )
