"""Step 3 of the InstructGPT recipe: PPO of the SFT policy against the reward model.

Each PPO step samples completions of a batch of prompts from the current
policy, scores them, and improves the policy on them for a few epochs:

1. rollout: format_prompt(prompt) → policy.generate; tokens after the first
   EOS (or newline, for one-line answers, as worker/generate.py samples) are
   masked out; a completion that hits max_new_tokens without stopping is
   truncated there and, if `missing_eos_penalty` is set, loses that much score;
2. reward: the reward model's score (or a Python `reward_fn`'s) at the last
   token, minus β · (log π(t) − log π_SFT(t)) at every token, the per-token KL
   to the frozen SFT reference (InstructGPT β = 0.02; optionally adapted
   towards a target KL as in Ziegler et al. 2019);
3. advantages: a separate value network (the reward model's body and head,
   or the policy's body with a fresh head when a reward_fn is used) and GAE(γ,
   λ), whitened over the batch's tokens;
4. optimisation: clipped policy ratio and clipped value loss, shuffled
   minibatches, several PPO epochs, gradient clipping; with ptx_coef γ > 0 the
   SFT loss on ptx_examples is mixed in (PPO-ptx).

The loop is plain torch, readable top to bottom; a full-state checkpoint
(policy, value, optimizer, schedule, KL coefficient, RNG, config) makes a killed
run resume to the result it would have reached. The policy is saved with
worker.modeling.save_model and becomes the next `policy` model version, which
samples the next batch of comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_constant_schedule_with_warmup,
)

# The config lives in the torch-free app.training.configs, where the web lists and checks a run's params;
# it stays importable from here.
from app.conversations import PromptInput
from app.training.configs import PPOConfig
from worker.common import (
    Progress,
    adamw,
    cosine_schedule,
    disable_dropout,
    encode_prompt,
    fingerprint,
    load_checkpoint,
    make_accelerator,
    micro_batches,
    position_ids,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    shuffled_batches,
)
from worker.generate import newline_token_ids
from worker.modeling import save_model
from worker.ppo_models import RewardFn, build_ppo_models
from worker.train_rm import RewardModel
from worker.train_sft import build_example, collate, response_loss_sum


def constant_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then the peak rate to the end."""
    return get_constant_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps))


# PPO's data is new at every step (fresh rollouts of the current policy), so a
# schedule that decays to 0 spends its last steps sampling and scoring rollouts
# that hardly move the policy. That decay also works as early stopping against
# over-optimising a small reward model: with InstructGPT's β = 0.02 on the
# bundled world, a constant rate drove KL to ~2.8 and the greedy true score
# below SFT's, so cosine stays the default. With a stronger KL penalty (β = 0.1,
# bench/learning.py) a constant rate gives the best sampled answers.
LR_SCHEDULES = {"constant": constant_schedule, "cosine": cosine_schedule}


class AdaptiveKLController:
    """Adapts β so the policy's KL to SFT tracks a target (Ziegler et al. 2019, as in TRL)."""

    def __init__(self, value: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_rollouts: int) -> None:
        """Moves β up when KL is above target, down when below, by at most 20% per horizon."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_rollouts / self.horizon


def load_params(params: list[tuple[str, torch.nn.Parameter]], state: dict[str, torch.Tensor]) -> None:
    """Copies a checkpoint's tensors into the trained parameters, by name."""
    missing = [name for name, _ in params if name not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} trained tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, param in params:
            param.copy_(state[name])


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance over the masked entries (0 elsewhere)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns over response tokens (masked positions are 0 and end the episode)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def response_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    mask: torch.Tensor,
    prompt_length: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the response tokens under the model and, if asked, the entropy at each response position.

    Vocabulary-sized tensors dominate PPO's activations, so only the response's logits are computed
    (`logits_to_keep`), the log-probability is read as logit − logsumexp (no full log-softmax kept for the
    backward pass), and the entropy, a logged statistic, is computed without a graph.
    """
    response_length = sequences.shape[1] - prompt_length
    # Position t predicts token t+1: the response's logits start one before it and end one before the last.
    logits = model(
        input_ids=sequences,
        attention_mask=mask,
        position_ids=position_ids(mask),
        logits_to_keep=response_length + 1,
    ).logits
    logits = logits[:, :-1].float() / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, sequences[:, prompt_length:].unsqueeze(-1)).squeeze(-1) - normaliser
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = normaliser - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return chosen, entropy


def response_values(
    value_model: RewardModel, sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """Value estimates of the states before each response token."""
    return value_model.token_scores(sequences, mask)[:, prompt_length - 1 : -1].float()


@dataclass
class Rollout:
    """Sampled completions of one prompt batch, as token tensors and texts."""

    prompts: list[PromptInput]
    sequences: torch.Tensor  # [B, P + R]: left-padded prompt, then response
    mask: torch.Tensor  # [B, P + R]: 1 on real prompt tokens and response tokens up to and including EOS
    prompt_length: int
    texts: list[str]
    ended: torch.Tensor  # [B] bool: the completion stopped (EOS or newline) before max_new_tokens

    @property
    def response_mask(self) -> torch.Tensor:
        """Mask of the response tokens, [B, R]."""
        return self.mask[:, self.prompt_length :].float()


def mask_after_stop(
    responses: torch.Tensor, stop_ids: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(responses with pad after the first stop token, mask up to and including it, whether one came)."""
    is_stop = torch.isin(responses, stop_ids.to(responses.device))
    ended = is_stop.any(1)
    # A completion that never stops is truncated at max_new_tokens: all its tokens count.
    first_stop = torch.where(ended, is_stop.int().argmax(1), responses.shape[1])
    keep = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0) <= first_stop.unsqueeze(1)
    return responses.masked_fill(~keep, pad_id), keep.long(), ended


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_at_newline: bool | None) -> torch.Tensor:
    """EOS, plus every token containing a newline when completions are one line (the sampler's rule)."""
    if stop_at_newline is None:
        stop_at_newline = not getattr(tokenizer, "chat_template", None)
    eos = torch.tensor([tokenizer.eos_token_id])
    return torch.cat([eos, newline_token_ids(tokenizer)]).unique() if stop_at_newline else eos


@torch.no_grad()
def sample(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[PromptInput], config: PPOConfig
) -> Rollout:
    """Samples one completion per prompt and masks everything after its first stop token."""
    device = next(policy.parameters()).device
    queries = [encode_prompt(tokenizer, p)[-config.max_prompt_length :] for p in prompts]
    width = max(len(q) for q in queries)
    input_ids = torch.full((len(queries), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, q in enumerate(queries):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(q) :] = torch.tensor(q)
        attention[row, width - len(q) :] = 1
    stop_ids = stop_token_ids(tokenizer, config.stop_at_newline)
    # Pure sampling from the policy (no top-k/top-p), so the PPO ratio is exact;
    # every stop token ends a row, as EOS does.
    generation = GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids.tolist(),
    )
    was_training = policy.training
    policy.eval()
    # Causal LMs mix in GenerationMixin; transformers 5 no longer declares `generate` on PreTrainedModel.
    output = cast(GenerationMixin, policy).generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=generation
    )
    policy.train(was_training)
    responses, keep, ended = mask_after_stop(output[:, width:], stop_ids, tokenizer.pad_token_id)
    # The scorer gets the text before the stop: no EOS, nothing from a newline on.
    # decode of one row of ids gives one text; transformers types the batch form alongside.
    texts = [
        cast(str, tokenizer.decode(row[: int(n)], skip_special_tokens=True)).split("\n", 1)[0].strip()
        for row, n in zip(responses.tolist(), keep.sum(1).tolist(), strict=True)
    ]
    return Rollout(
        prompts=list(prompts),
        sequences=torch.cat([input_ids.to(device), responses], 1),
        mask=torch.cat([attention.to(device), keep], 1),
        prompt_length=width,
        texts=texts,
        ended=ended,
    )


@torch.no_grad()
def evaluate_policy(
    policy: PreTrainedModel,
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scorer: RewardFn,
    prompts: Sequence[PromptInput],
    config: PPOConfig,
) -> dict[str, float]:
    """Mean score, KL to the SFT reference (nats per completion), length and stop rate on prompts."""
    # A fixed seed in a forked RNG: evaluations before and after training sample
    # alike, and the training RNG (hence resumption) is untouched.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    scores, kls, lengths, ended = [], [], [], []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed + 1)
        for start in range(0, len(prompts), config.eval_batch_size):
            rollout = sample(policy, tokenizer, prompts[start : start + config.eval_batch_size], config)
            args = (rollout.sequences, rollout.mask, rollout.prompt_length, config.temperature)
            logp, _ = response_logprobs(policy, *args)
            ref_logp, _ = response_logprobs(reference, *args)
            kls += ((logp - ref_logp) * rollout.response_mask).sum(1).tolist()
            scores += scorer(rollout.prompts, rollout.texts)
            lengths += rollout.response_mask.sum(1).tolist()
            ended += rollout.ended.float().tolist()
    n = max(len(scores), 1)
    return {
        "reward": sum(scores) / n,
        "kl": sum(kls) / n,
        "response_length": sum(lengths) / n,
        "ended_fraction": sum(ended) / n,
    }


def ptx_example(
    tokenizer: PreTrainedTokenizerBase, prompt: PromptInput, completion: str, max_length: int
) -> dict[str, list[int]]:
    """An SFT example; with an empty prompt, plain pretraining text trained on every token."""
    if prompt:
        return build_example(tokenizer, prompt, completion, max_length)
    ids = [*tokenizer(completion, add_special_tokens=True)["input_ids"][: max_length - 1], tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def train_ppo(
    policy_path: str | Path,
    reward_model_path: str | Path | RewardFn,
    prompts: Sequence[PromptInput],
    config: PPOConfig | None,
    out_dir: str | Path,
    *,
    ptx_examples: Sequence[tuple[PromptInput, str]] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | None = None,
    eval_prompts: Sequence[PromptInput] | None = None,
) -> dict[str, Any]:
    """Optimises the SFT policy with PPO against a saved reward model (or a reward_fn); saves it to out_dir."""
    config = config or PPOConfig()
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    if config.temperature <= 0:
        raise ValueError("PPO samples its rollouts: temperature must be > 0")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, not {config.lr_schedule!r}")
    accelerator = make_accelerator(config.device, config.mixed_precision)
    device = accelerator.device
    seed_everything(config.seed)

    # Four networks as full copies, or adapters on one or two frozen bases (worker/ppo_models.py).
    models = build_ppo_models(policy_path, reward_model_path, config, device)
    policy, reference, value, scorer, tokenizer = (
        models.policy,
        models.reference,
        models.value,
        models.scorer,
        models.tokenizer,
    )
    policy_params = [p for _, p in models.policy_params]
    value_params = [p for _, p in models.value_params]
    for model in (policy, value):
        disable_dropout(model)
        model.train()
    ptx_length = config.max_prompt_length + config.max_new_tokens
    ptx = [ptx_example(tokenizer, p, c, ptx_length) for p, c in ptx_examples or []]
    eval_prompts = eval_prompts or prompts[: config.eval_size]

    minibatches_per_step = math.ceil(config.rollout_batch_size / config.minibatch_size)
    total_updates = config.steps * config.ppo_epochs * minibatches_per_step
    optimizer = torch.optim.AdamW(
        adamw(models.policy_params, config.learning_rate, config.weight_decay)
        + adamw(models.value_params, config.value_learning_rate, config.weight_decay)
    )
    scheduler = LR_SCHEDULES[config.lr_schedule](optimizer, total_updates, config.warmup_ratio)
    history: dict[str, Any] = {"step": 0, "kl_coef": config.kl_coef, "log": []}
    reward_id = (
        getattr(reward_model_path, "__qualname__", "fn") if callable(reward_model_path) else str(reward_model_path)
    )
    data_id = fingerprint([str(policy_path), reward_id, prompts, ptx_examples, eval_prompts])
    state = load_checkpoint(checkpoint_dir, config, data_id)
    if state is not None:
        load_params(models.policy_params, state["policy"])
        load_params(models.value_params, state["value"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        set_rng_state(state["rng"])
    else:
        history["eval_initial"] = evaluate_policy(policy, reference, tokenizer, scorer, eval_prompts, config)
    kl_control = AdaptiveKLController(history["kl_coef"], config.kl_target, config.kl_horizon)
    policy_model, value_model, optimizer = accelerator.prepare(policy, value, optimizer)

    def prompts_for(step: int) -> list[PromptInput]:
        # Walk through the prompts in a fresh seeded order on every pass.
        orders: dict[int, list[int]] = {}
        chosen = []
        for i in range(step * config.rollout_batch_size, (step + 1) * config.rollout_batch_size):
            pass_, pos = divmod(i, len(prompts))
            if pass_ not in orders:
                orders[pass_] = shuffled_batches(len(prompts), len(prompts), config.seed, pass_)[0]
            chosen.append(prompts[orders[pass_][pos]])
        return chosen[accelerator.process_index :: accelerator.num_processes]

    while history["step"] < config.steps:
        step = history["step"]
        # ---- 1. rollout
        rollout = sample(policy, tokenizer, prompts_for(step), config)
        mask, batch = rollout.response_mask, len(rollout.prompts)
        scores = torch.tensor(scorer(rollout.prompts, rollout.texts), dtype=torch.float, device=device)
        if scores.shape != (batch,):
            raise ValueError(f"the reward function returned {tuple(scores.shape)} scores for {batch} completions")
        if config.missing_eos_penalty is not None:
            scores = torch.where(rollout.ended, scores, scores - config.missing_eos_penalty)

        # ---- 2. reward: score at the last real token, minus β · KL at every token
        with torch.no_grad(), accelerator.autocast():
            old_parts: list[torch.Tensor] = []
            ref_parts: list[torch.Tensor] = []
            value_parts: list[torch.Tensor] = []
            for rows in micro_batches(list(range(batch)), config.micro_batch_size):
                args = (rollout.sequences[rows], rollout.mask[rows], rollout.prompt_length)
                old_parts.append(response_logprobs(policy, *args, config.temperature)[0])
                ref_parts.append(response_logprobs(reference, *args, config.temperature)[0])
                value_parts.append(response_values(value, *args))
            old_logprobs, ref_logprobs = torch.cat(old_parts), torch.cat(ref_parts)
            old_values = torch.cat(value_parts) * mask
        kl = (old_logprobs - ref_logprobs) * mask
        rewards = -kl_control.value * kl
        last = (mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(batch, device=device), last] += scores

        # ---- 3. advantages
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask)

        # ---- 4. PPO epochs over shuffled minibatches
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clipfrac", "entropy", "approx_kl", "ptx_loss")
        }
        for _ in range(config.ppo_epochs):
            order = torch.randperm(batch).tolist()
            for minibatch in micro_batches(order, config.minibatch_size):
                n_tokens = mask[minibatch].sum().clamp(min=1)
                for rows in micro_batches(minibatch, config.micro_batch_size):
                    m = mask[rows]
                    args = (rollout.sequences[rows], rollout.mask[rows], rollout.prompt_length)
                    with accelerator.autocast():
                        logprobs, entropy = response_logprobs(
                            policy_model, *args, config.temperature, with_entropy=True
                        )
                    ratio = torch.exp(logprobs - old_logprobs[rows])
                    pg_losses = torch.max(
                        -advantages[rows] * ratio,
                        -advantages[rows] * ratio.clamp(1 - config.cliprange, 1 + config.cliprange),
                    )
                    # Token sums over the minibatch's token count: accumulation = one big batch.
                    policy_loss = (pg_losses * m).sum() / n_tokens
                    accelerator.backward(policy_loss)
                    # The value network's own backward pass, in its adapter's scope (see worker/ppo_models.py).
                    with models.value_scope():
                        with accelerator.autocast():
                            values = response_values(value_model, *args)
                        clipped_values = old_values[rows] + (values - old_values[rows]).clamp(
                            -config.cliprange_value, config.cliprange_value
                        )
                        vf_losses = 0.5 * torch.max(
                            (values - returns[rows]) ** 2, (clipped_values - returns[rows]) ** 2
                        )
                        value_loss = (vf_losses * m).sum() / n_tokens
                        accelerator.backward(value_loss)
                    stats["policy_loss"].append(policy_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    with torch.no_grad():
                        clipped = ((ratio - 1).abs() > config.cliprange).float()
                        stats["clipfrac"].append(masked_mean(clipped, m).item())
                        stats["entropy"].append(masked_mean(cast(torch.Tensor, entropy), m).item())
                        stats["approx_kl"].append(masked_mean(0.5 * (logprobs - old_logprobs[rows]) ** 2, m).item())
                if ptx and config.ptx_coef > 0:
                    picks = torch.randint(len(ptx), (config.ptx_batch_size,)).tolist()
                    with accelerator.autocast():
                        ptx_batch = collate([ptx[i] for i in picks], tokenizer.pad_token_id)
                        loss_sum, count = response_loss_sum(policy_model, ptx_batch)
                    accelerator.backward(config.ptx_coef * loss_sum / max(count, 1))
                    stats["ptx_loss"].append(loss_sum.item() / max(count, 1))
                if config.max_grad_norm > 0:
                    # Clipped per network: the value loss's scale must not throttle the policy.
                    accelerator.clip_grad_norm_(policy_params, config.max_grad_norm)
                    accelerator.clip_grad_norm_(value_params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        mean_kl = float(kl.sum(1).mean())
        local_metrics = {
            "reward": float(scores.mean()),
            "kl": mean_kl,
            "kl_coef": kl_control.value,
            "total_reward": float(rewards.sum(1).mean()),
            "response_length": float(mask.sum(1).mean()),
            "ended_fraction": float(rollout.ended.float().mean()),
            "lr": scheduler.get_last_lr()[0],
            **{k: sum(v) / len(v) for k, v in stats.items() if v},
        }
        metrics = {
            k: float(accelerator.reduce(torch.tensor(v, dtype=torch.float64, device=device), "mean"))
            for k, v in local_metrics.items()
        }
        if config.adaptive_kl:
            kl_control.update(metrics["kl"], config.rollout_batch_size)
        history.update(step=step + 1, kl_coef=kl_control.value)
        history["log"].append(metrics)
        if (
            checkpoint_dir
            and accelerator.is_main_process
            and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps)
        ):
            save_checkpoint(
                checkpoint_dir,
                {
                    "policy": {n: p.detach() for n, p in models.policy_params},
                    "value": {n: p.detach() for n, p in models.value_params},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "rng": rng_state(),
                    "config": asdict(config),
                    "data_fingerprint": data_id,
                },
            )
        if progress and accelerator.is_main_process:
            progress(step + 1, config.steps, metrics)

    final_eval = evaluate_policy(policy, reference, tokenizer, scorer, eval_prompts, config)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(policy, tokenizer, out_dir, adapter_only=config.lora_save == "adapter")
    return {
        "eval": final_eval,
        "eval_initial": history["eval_initial"],
        "reward_curve": [m["reward"] for m in history["log"]],
        "kl_curve": [m["kl"] for m in history["log"]],
        "log": history["log"],
        "kl_coef": kl_control.value,
        "steps": history["step"],
        "n_prompts": len(prompts),
        "n_eval_prompts": len(eval_prompts),
        "trained_parameters": sum(p.numel() for p in policy_params),
        "frozen_bases": models.frozen_bases,
        # How the version is saved: "full" weights, a LoRA adapter "merged" into them, or the "adapter" alone.
        "saved_as": config.lora_save if config.lora_r else "full",
    }
