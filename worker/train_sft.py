"""Step 1 of the InstructGPT recipe: supervised fine-tuning on demonstrations.

Labelers' demonstrations arrive as (prompt, completion) pairs. The causal LM
sees format_prompt(prompt) followed by the completion and an EOS token, and
learns to predict the completion tokens only: prompt tokens carry the label
-100, so the model is taught to answer, not to write prompts, and the EOS
teaches it to stop. The loop below is plain torch, readable top to bottom:
warmup + cosine learning rate, gradient accumulation, a validation loss after
every epoch, early stopping that keeps the best epoch, and a full-state
checkpoint (weights, optimizer, schedule, step, RNG, config) so a killed run
resumes to exactly the result it would have reached. The result is saved with
worker.modeling.save_model and becomes the next `sft` model version; PPO-ptx
reuses this module's loss.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

# The config lives in the torch-free app.training.configs, where the web lists and checks a run's params;
# it stays importable from here.
from app.conversations import PromptInput
from app.training.configs import SFTConfig
from worker.adapters import load_trainable_state, prepare_for_training, trainable_state, weights_dtype
from worker.common import (
    Progress,
    adamw,
    cosine_schedule,
    encode_pair,
    fingerprint,
    load_checkpoint,
    make_accelerator,
    micro_batches,
    pad_right,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    shuffled_batches,
)
from worker.modeling import load_model, save_model

IGNORE_INDEX = -100


def build_example(
    tokenizer: PreTrainedTokenizerBase, prompt: PromptInput, completion: str, max_length: int
) -> dict[str, list[int]]:
    """One training example: input ids of prompt + completion + EOS, labels -100 on the prompt."""
    prompt_ids, completion_ids = encode_pair(tokenizer, prompt, completion, max_length)
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads examples into input_ids, attention_mask and labels (-100 on padding)."""
    input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad_right([e["labels"] for e in examples], pad_id, fill=IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled (response) tokens, and their count."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    # Token t predicts token t+1, so labels are shifted left by one.
    targets = batch["labels"][:, 1:].to(device)
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def label_count(example: dict[str, list[int]]) -> int:
    """How many tokens of an example are trained on (the completion and its EOS, minus the first)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int
) -> float:
    """Mean per-token loss on the examples' response tokens."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, count = response_loss_sum(model, collate(examples[start : start + batch_size], pad_id))
        total, tokens = total + float(loss), tokens + count
    model.train(was_training)
    return total / max(tokens, 1)


def train_sft(
    model_path: str | Path,
    train: Sequence[tuple[PromptInput, str]],
    valid: Sequence[tuple[PromptInput, str]],
    config: SFTConfig | None,
    out_dir: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tunes the causal LM at model_path on (prompt, completion) pairs and saves the best epoch to out_dir."""
    config = config or SFTConfig()
    if not train:
        raise ValueError("SFT needs at least one demonstration")
    accelerator = make_accelerator(config.device, config.mixed_precision)
    seed_everything(config.seed)
    # fp32 master weights unless the config says otherwise; mixed precision, if any, is accelerate's autocast.
    model, tokenizer = load_model(model_path, str(accelerator.device), weights_dtype(config, accelerator.device))
    model = prepare_for_training(model, config)
    pad_id = tokenizer.pad_token_id

    train_examples = [build_example(tokenizer, p, c, config.max_length) for p, c in train]
    valid_examples = [build_example(tokenizer, p, c, config.max_length) for p, c in valid]
    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(adamw(model.named_parameters(), config.learning_rate, config.weight_decay))
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    history: dict[str, Any] = {
        "step": 0,
        "train_loss_curve": [],
        "valid_loss_curve": [],
        "epoch_losses": [],
        "best_valid_loss": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "stopped_early": False,
        "initial_valid_loss": None,
    }
    data_id = fingerprint([str(model_path), train, valid])
    state = load_checkpoint(checkpoint_dir, config, data_id)
    if state is not None:
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        set_rng_state(state["rng"])
    elif valid_examples:
        history["initial_valid_loss"] = validation_loss(model, valid_examples, pad_id, config.eval_batch_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    # The best epoch's weights live in a directory that survives a restart when
    # there is a checkpoint directory, else in a temporary one.
    scratch: tempfile.TemporaryDirectory[str] | None = None
    if checkpoint_dir:
        best_dir = Path(checkpoint_dir) / "best"
    else:
        scratch = tempfile.TemporaryDirectory(prefix="sft-best-")
        best_dir = Path(scratch.name) / "best"

    def checkpoint() -> None:
        if checkpoint_dir and accelerator.is_main_process:
            save_checkpoint(
                checkpoint_dir,
                {
                    "model": trainable_state(unwrapped),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "rng": rng_state(),
                    "config": asdict(config),
                    "data_fingerprint": data_id,
                },
            )

    try:
        model.train()
        while history["step"] < total_steps and not history["stopped_early"]:
            step = history["step"]
            epoch, first = divmod(step, steps_per_epoch)
            for batch in shuffled_batches(len(train_examples), config.batch_size, config.seed, epoch)[first:]:
                # Normalise by the response tokens of the whole step, so gradient
                # accumulation gives the same update as one big batch.
                n_tokens = sum(label_count(train_examples[i]) for i in batch)
                shard = batch[accelerator.process_index :: accelerator.num_processes]
                step_loss = 0.0
                for micro in micro_batches(shard, config.micro_batch_size):
                    with accelerator.autocast():
                        loss_sum, _ = response_loss_sum(model, collate([train_examples[i] for i in micro], pad_id))
                    # DDP averages gradients over processes; scale back to a sum.
                    accelerator.backward(loss_sum * accelerator.num_processes / max(n_tokens, 1))
                    step_loss += loss_sum.item()
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = float(
                    accelerator.reduce(torch.tensor(step_loss, dtype=torch.float64, device=accelerator.device), "sum")
                )
                history["step"] = step = step + 1
                history["epoch_losses"].append(step_loss / max(n_tokens, 1))
                metrics = {"loss": history["epoch_losses"][-1], "lr": scheduler.get_last_lr()[0], "epoch": epoch + 1}

                epoch_done = step % steps_per_epoch == 0
                if epoch_done:
                    history["train_loss_curve"].append(sum(history["epoch_losses"]) / len(history["epoch_losses"]))
                    history["epoch_losses"] = []
                    if valid_examples:
                        loss = validation_loss(model, valid_examples, pad_id, config.eval_batch_size)
                        history["valid_loss_curve"].append(loss)
                        metrics["valid_loss"] = loss
                        if loss < history["best_valid_loss"]:
                            history.update(best_valid_loss=loss, best_epoch=epoch + 1, bad_epochs=0)
                            if accelerator.is_main_process:
                                # With LoRA the adapter alone: a few MB instead of the model.
                                save_model(unwrapped, tokenizer, best_dir, adapter_only=bool(config.lora_r))
                        else:
                            history["bad_epochs"] += 1
                            patience = config.early_stopping_patience
                            history["stopped_early"] = patience is not None and history["bad_epochs"] >= patience
                if epoch_done or step % config.checkpoint_every == 0:
                    checkpoint()
                if progress and accelerator.is_main_process:
                    progress(step, total_steps, metrics)
                if history["stopped_early"]:
                    break

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = unwrapped
            epochs_run = len(history["train_loss_curve"])
            if valid_examples and history["best_epoch"] != epochs_run:
                if config.lora_r:
                    from peft import load_peft_weights, set_peft_model_state_dict

                    set_peft_model_state_dict(unwrapped, load_peft_weights(str(best_dir), device="cpu"))
                else:
                    # On CPU the reload is fp32, like the weights trained here.
                    final, _ = load_model(best_dir, device="cpu")
            save_model(final, tokenizer, out_dir, adapter_only=config.lora_save == "adapter")
    finally:
        if scratch is not None:
            scratch.cleanup()

    curve = history["train_loss_curve"]
    return {
        "train_loss": curve[-1] if curve else None,
        "train_loss_curve": curve,
        "valid_loss": history["best_valid_loss"] if valid_examples else None,
        "valid_loss_curve": history["valid_loss_curve"],
        "initial_valid_loss": history["initial_valid_loss"],
        "best_epoch": history["best_epoch"] if valid_examples else len(curve),
        "epochs_run": len(curve),
        "stopped_early": history["stopped_early"],
        "steps": history["step"],
        "n_train": len(train_examples),
        "n_valid": len(valid_examples),
        # How the version is saved: "full" weights, a LoRA adapter "merged" into them, or the "adapter" alone.
        "saved_as": config.lora_save if config.lora_r else "full",
    }
