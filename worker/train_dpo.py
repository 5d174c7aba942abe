"""DPO straight from K-way rankings with ties: the policy learns the labelers' rankings without a reward model.

DPO (Rafailov et al. 2023) trains the policy π on preferences through its implicit reward
r(x, y) = β · (log π(y|x) − log π_ref(y|x)), with π_ref the starting (SFT) model. Peers feed it pairs, so
a K = 9 ranking becomes up to 36 (chosen, rejected) examples and 72 forward passes through each model.
Here a ranking stays whole: its K completions go through the policy once, in one micro-batch, and their
implicit rewards enter the same losses as the reward model's (worker/train_rm.py):

- `pairwise`: the mean over the ranking's non-tied pairs of −log σ(r_w − r_l), DPO's loss, every ranking
  weighted equally (InstructGPT's eq. 1 on implicit rewards);
- `listwise`: the Plackett–Luce likelihood of the whole ranking with Efron's treatment of ties (the
  listwise DPO of Liu et al. 2024 "LiPO", and Song et al. 2024 "PRO", with ties).

The reference log-probabilities of every completion are computed once, before training, by the model as
loaded (the reference is the starting point), and cached: no second copy of the model is held while it
trains, with or without LoRA (TRL's `precompute_ref_log_probs`, made the only way). The loop is the other
trainers' (worker/common.py): warmup + cosine, whole rankings per step, full-state checkpoints that
resume to the same weights, the memory options of worker/adapters.py. The result is a `policy` version.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

# The config lives in the torch-free app.training.configs beside the other trainers'; importable from here.
from app.training.configs import DPOConfig
from worker.adapters import load_trainable_state, prepare_for_training, trainable_state, weights_dtype
from worker.common import (
    Progress,
    adamw,
    cosine_schedule,
    disable_dropout,
    fingerprint,
    load_checkpoint,
    make_accelerator,
    micro_batches,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    shuffled_batches,
)
from worker.modeling import load_model, save_model
from worker.train_rm import RANKING_LOSSES, RankingExample, pair_outcomes
from worker.train_sft import IGNORE_INDEX, build_example, collate


def sequence_logprobs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rankings: list[RankingExample], max_length: int
) -> torch.Tensor:
    """Summed log-probability of each completion (its tokens and EOS) given its prompt; one row per completion."""
    examples = [build_example(tokenizer, r.prompt, c, max_length) for r in rankings for c in r.completions]
    batch = collate(examples, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    # Token t predicts token t+1.
    targets = batch["labels"][:, 1:].to(device)
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (picked * (targets != IGNORE_INDEX)).sum(-1)


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rankings: list[RankingExample], config: DPOConfig
) -> list[torch.Tensor]:
    """Each ranking's completions' log-probabilities under the model as it is now (the reference), on the CPU."""
    was_training = model.training
    model.eval()
    cached = []
    for start in range(0, len(rankings), config.eval_batch_size):
        chunk = rankings[start : start + config.eval_batch_size]
        logps = sequence_logprobs(model, tokenizer, chunk, config.max_length).cpu()
        offset = 0
        for ranking in chunk:
            cached.append(logps[offset : offset + len(ranking.completions)])
            offset += len(ranking.completions)
    model.train(was_training)
    return cached


def ranking_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rankings: list[RankingExample],
    references: list[torch.Tensor],
    config: DPOConfig,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward all completions of the rankings once; (summed loss, each ranking's implicit rewards, detached)."""
    logps = sequence_logprobs(model, tokenizer, rankings, config.max_length)
    loss = logps.sum() * 0.0
    rewards = []
    offset = 0
    for ranking, reference in zip(rankings, references, strict=True):
        k = len(ranking.completions)
        implicit = config.beta * (logps[offset : offset + k] - reference.to(logps.device))
        offset += k
        loss = loss + RANKING_LOSSES[config.loss](implicit, ranking.ranks)
        rewards.append(implicit.detach())
    return loss, rewards


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rankings: list[RankingExample],
    references: list[torch.Tensor],
    config: DPOConfig,
) -> dict[str, Any]:
    """Held-out loss, the implicit reward's pairwise accuracy on the rankings, and its mean margin over pairs."""
    was_training = model.training
    model.eval()
    loss_sum, correct, pairs, margin = 0.0, 0.0, 0, 0.0
    for start in range(0, len(rankings), config.eval_batch_size):
        chunk = rankings[start : start + config.eval_batch_size]
        loss, rewards = ranking_losses(model, tokenizer, chunk, references[start : start + len(chunk)], config)
        loss_sum += float(loss)
        for ranking, implicit in zip(chunk, rewards, strict=True):
            ok, n = pair_outcomes(implicit, ranking.ranks)
            correct, pairs = correct + ok, pairs + n
            ranks = torch.as_tensor(ranking.ranks, device=implicit.device)
            better = ranks.unsqueeze(1) < ranks.unsqueeze(0)
            margin += float((implicit.unsqueeze(1) - implicit.unsqueeze(0))[better].sum())
    model.train(was_training)
    return {
        "loss": loss_sum / max(len(rankings), 1),
        "accuracy": correct / pairs if pairs else None,
        "margin": margin / pairs if pairs else None,
        "pairs": pairs,
    }


def train_dpo(
    policy_path: str | Path,
    train: list[RankingExample],
    valid: list[RankingExample],
    config: DPOConfig | None,
    out_dir: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Trains the policy at policy_path on whole rankings with DPO (pairwise or listwise); saves it to out_dir."""
    config = config or DPOConfig()
    usable = [r for r in train if r.n_pairs]
    valid = [r for r in valid if r.n_pairs]
    if not usable:
        raise ValueError("DPO needs at least one ranking with two different ranks")
    accelerator = make_accelerator(config.device, config.mixed_precision)
    seed_everything(config.seed)
    model, tokenizer = load_model(policy_path, str(accelerator.device), weights_dtype(config, accelerator.device))
    # The model as loaded is the reference: its log-probabilities are cached before a weight moves.
    train_refs = reference_logprobs(model, tokenizer, usable, config)
    valid_refs = reference_logprobs(model, tokenizer, valid, config)
    model = prepare_for_training(model, config)
    disable_dropout(model)  # the implicit rewards compare log-probabilities across passes, as PPO's ratios do

    steps_per_epoch = math.ceil(len(usable) / config.rankings_per_step)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(adamw(model.named_parameters(), config.learning_rate, config.weight_decay))
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    history: dict[str, Any] = {"step": 0, "epoch_losses": [], "train_loss_curve": [], "valid_curve": []}
    data_id = fingerprint([str(policy_path), [asdict(r) for r in train], [asdict(r) for r in valid]])
    state = load_checkpoint(checkpoint_dir, config, data_id)
    if state is not None:
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        set_rng_state(state["rng"])
    else:
        history["initial_valid"] = evaluate(model, tokenizer, valid, valid_refs, config) if valid else None
    prepared, optimizer = accelerator.prepare(model, optimizer)

    prepared.train()
    while history["step"] < total_steps:
        step = history["step"]
        epoch, first = divmod(step, steps_per_epoch)
        for batch in shuffled_batches(len(usable), config.rankings_per_step, config.seed, epoch)[first:]:
            shard = batch[accelerator.process_index :: accelerator.num_processes]
            step_loss, correct, pairs, rows = 0.0, 0.0, 0, 0
            for micro in micro_batches(shard, config.rankings_per_micro_batch):
                rankings = [usable[i] for i in micro]
                with accelerator.autocast():
                    loss, rewards = ranking_losses(
                        prepared, tokenizer, rankings, [train_refs[i] for i in micro], config
                    )
                # Each ranking counts once in the step's mean, whatever its K.
                accelerator.backward(loss * accelerator.num_processes / len(batch))
                step_loss += loss.item()
                for ranking, implicit in zip(rankings, rewards, strict=True):
                    ok, n = pair_outcomes(implicit, ranking.ranks)
                    correct, pairs = correct + ok, pairs + n
                rows += sum(len(r.completions) for r in rankings)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(prepared.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history["step"] = step = step + 1
            history["epoch_losses"].append(step_loss / len(shard))
            metrics = {
                "loss": step_loss / len(shard),
                "accuracy": correct / max(pairs, 1),
                "rows": rows,
                "lr": scheduler.get_last_lr()[0],
                "epoch": epoch + 1,
            }
            epoch_done = step % steps_per_epoch == 0
            if epoch_done:
                history["train_loss_curve"].append(sum(history["epoch_losses"]) / len(history["epoch_losses"]))
                history["epoch_losses"] = []
                if valid:
                    result = evaluate(model, tokenizer, valid, valid_refs, config)
                    history["valid_curve"].append(result)
                    metrics.update(valid_loss=result["loss"], valid_accuracy=result["accuracy"])
            if checkpoint_dir and accelerator.is_main_process and (epoch_done or step % config.checkpoint_every == 0):
                save_checkpoint(
                    checkpoint_dir,
                    {
                        "model": trainable_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": history,
                        "rng": rng_state(),
                        "config": asdict(config),
                        "data_fingerprint": data_id,
                    },
                )
            if progress and accelerator.is_main_process:
                progress(step, total_steps, metrics)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(model, tokenizer, out_dir, adapter_only=config.lora_save == "adapter")
    final = history["valid_curve"][-1] if history["valid_curve"] else None
    initial = history.get("initial_valid")
    curve = history["train_loss_curve"]
    return {
        "train_loss": curve[-1] if curve else None,
        "train_loss_curve": curve,
        "valid_loss": final["loss"] if final else None,
        "valid_accuracy": final["accuracy"] if final else None,
        "valid_margin": final["margin"] if final else None,
        "initial_valid_accuracy": initial["accuracy"] if initial else None,
        "valid_accuracy_curve": [v["accuracy"] for v in history["valid_curve"]],
        "valid_pairs": final["pairs"] if final else 0,
        "steps": history["step"],
        "n_train": len(usable),
        "n_train_all_ties": len(train) - len(usable),
        "n_valid": len(valid),
        "forward_rows_per_epoch": sum(len(r.completions) for r in usable),
        "saved_as": config.lora_save if config.lora_r else "full",
    }
