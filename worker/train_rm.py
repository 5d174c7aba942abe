"""Step 2 of the InstructGPT recipe: the reward model, trained on labelers' rankings.

A labeler ranks K = 4..9 completions of one prompt (rank 1 best, ties share a
rank). The reward model is the causal LM's transformer body with a scalar head
read at the last real token of format_prompt(prompt) + completion + EOS. Its
loss per ranking is InstructGPT's eq. 1: the mean over the ranking's non-tied
pairs of -log σ(r_w − r_l), every ranking weighted equally. All K completions
of a ranking go through the model once, in the same micro-batch (K forward
rows, not 2·C(K,2)), because the paper found that pairs fed as independent
examples overfit after one pass. After training the rewards are shifted so
that demonstrations (or, without them, the training completions) score 0 on
average, which keeps PPO's reward on a stable scale; the shift is saved with
the model. PPO (worker/train_ppo.py) scores its rollouts with this model and
starts its value network from it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# The config lives in the torch-free app.training.configs, where the web lists and checks a run's params;
# it stays importable from here.
from app.conversations import PromptInput
from app.training.configs import RMConfig
from worker.adapters import (
    AdapterView,
    is_peft,
    load_trainable_state,
    merged_state_dict,
    prepare_for_training,
    trainable_state,
    weights_dtype,
)
from worker.common import (
    Progress,
    adamw,
    cosine_schedule,
    disable_dropout,
    encode_pair,
    fingerprint,
    load_checkpoint,
    make_accelerator,
    micro_batches,
    pad_right,
    position_ids,
    replace_directory,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    shuffled_batches,
)
from worker.modeling import load_model, prepare_tokenizer

HEAD_FILE = "head.safetensors"
META_FILE = "reward_model.json"


@dataclass
class RankingExample:
    """One labeler's ranking of K completions of a prompt (rank 1 is best; ties share a rank)."""

    prompt: PromptInput
    completions: list[str]
    ranks: list[int]
    labeler: str | None = None

    def __post_init__(self) -> None:
        if len(self.completions) != len(self.ranks):
            raise ValueError("a ranking needs exactly one rank per completion")

    @property
    def n_pairs(self) -> int:
        """How many (better, worse) pairs the ranking yields; tied completions yield none."""
        return sum(1 for a in self.ranks for b in self.ranks if a < b)


class RewardModel(nn.Module):
    """A transformer body with a scalar head read at the last real token; also PPO's value network."""

    def __init__(
        self, backbone: PreTrainedModel | AdapterView, reward_offset: float = 0.0, max_length: int = 1024
    ) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        # As in OpenAI's lm-human-preferences: unit-variance scores at init.
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self.reward_offset = reward_offset
        self.max_length = max_length

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel, max_length: int = 1024) -> RewardModel:
        """Builds a reward model on the body of a causal LM (its LM head is dropped)."""
        # transformers types `base_model` as nn.Module; on a causal LM it is the PreTrainedModel body (e.g. LlamaModel).
        return cls(cast(PreTrainedModel, model.base_model), max_length=max_length)

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw head output at every position, [batch, length] (PPO reads values from this)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per row, read at its last real token (left or right padding), minus the offset."""
        scores = self.token_scores(input_ids, attention_mask)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(-1)
        return scores.gather(1, last.unsqueeze(1)).squeeze(1) - self.reward_offset

    def save(
        self, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, *, adapter_base: str | None = None
    ) -> Path:
        """Writes backbone (save_pretrained), head weights and offset to `path` atomically.

        A LoRA backbone is saved merged, or, given adapter_base (the causal LM it was trained on), as the
        adapter alone: PPO then runs the reward model as an adapter on that base instead of a second copy.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        backbone: Any = self.backbone
        if is_peft(backbone) and adapter_base:
            backbone.save_pretrained(tmp / "backbone")
        elif is_peft(backbone):
            body = backbone.get_base_model()
            body.save_pretrained(tmp / "backbone", state_dict=merged_state_dict(backbone), safe_serialization=True)
        else:
            backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, tmp / HEAD_FILE)
        meta: dict[str, Any] = {"reward_offset": self.reward_offset, "max_length": self.max_length, "format": 1}
        if is_peft(backbone) and adapter_base:
            meta["adapter_base"] = adapter_base
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return replace_directory(tmp, target)

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> RewardModel:
        """Loads a reward model written by save() (fp32 unless dtype says; an adapter merged onto its base)."""
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("adapter_base"):
            from peft import PeftModel

            # The base may itself be an adapter saved alone (an SFT version): load_model merges it first.
            lm, _ = load_model(meta["adapter_base"], device="cpu", dtype=dtype)
            body = cast(PreTrainedModel, lm.base_model)
            backbone = PeftModel.from_pretrained(body, str(path / "backbone")).merge_and_unload()
        else:
            backbone = AutoModel.from_pretrained(path / "backbone", dtype=dtype)
        model = cls(backbone, reward_offset=meta["reward_offset"], max_length=meta.get("max_length", 1024))
        model.head.load_state_dict(load_file(path / HEAD_FILE))
        return model.to(device or "cpu").eval()


def load_reward_model(
    path: str | Path, device: str | torch.device | None = None
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """Loads a saved reward model and the tokenizer saved beside it."""
    return RewardModel.load(path, device), prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)))


def kway_loss(scores: torch.Tensor, ranks: list[int] | torch.Tensor, l2: float = 0.0) -> torch.Tensor:
    """InstructGPT eq. 1 for one ranking: mean over non-tied pairs of -log σ(r_better − r_worse) (+ l2·mean r²)."""
    ranks = torch.as_tensor(ranks, device=scores.device)
    better = ranks.unsqueeze(1) < ranks.unsqueeze(0)  # [i, j]: completion i is ranked above j
    if not better.any():
        # An all-tie ranking teaches nothing; keep the graph so callers can sum.
        return scores.sum() * 0.0
    margins = scores.unsqueeze(1) - scores.unsqueeze(0)
    loss = -F.logsigmoid(margins[better]).mean()
    return loss + l2 * scores.pow(2).mean() if l2 else loss


def listwise_loss(scores: torch.Tensor, ranks: list[int] | torch.Tensor, l2: float = 0.0) -> torch.Tensor:
    """Plackett–Luce negative log-likelihood of one ranking with ties (Efron's method), per tie group.

    A ranking with tie groups G_1 (best), …, G_m is read as choosing each group in turn from what is left,
    R_k = G_k ∪ … ∪ G_m. Without ties, P = Π_k exp(r_k) / Σ_{j∈R_k} exp(r_j) (Plackett 1975, Luce 1959).
    A tie group of d outputs is scored with Efron's (1977) approximation of the tied partial likelihood
    (JASA 72:557, eq. 3.1, the form Cox regression uses for tied event times):

        log L_k = Σ_{i∈G_k} r_i − Σ_{l=0}^{d−1} log( Σ_{j∈R_k} e^{r_j} − (l/d) Σ_{i∈G_k} e^{r_i} )

    which is Plackett–Luce when d = 1 and, unlike Breslow's approximation, is largest when the tied outputs
    score alike. For K = 2 without a tie it is exactly the pairwise loss, −log σ(r_w − r_l). The loss is
    −Σ_k log L_k divided by the number of groups, so every ranking weighs about the same whatever its K.
    """
    ranks = torch.as_tensor(ranks, device=scores.device)
    levels = torch.unique(ranks)  # sorted: best rank first
    if len(levels) < 2:
        return scores.sum() * 0.0  # an all-tie ranking teaches nothing, as in kway_loss
    total = scores.sum() * 0.0
    for level in levels:
        tied = ranks == level
        left = ranks >= level  # this group and every worse one
        rest = scores[left & ~tied]
        group = scores[tied]
        d = int(tied.sum())
        for step in range(d):
            # log(Σ_{R∖G} e^r + (1 − l/d) Σ_G e^r) with l = step, stably
            weighted = group + math.log(1.0 - step / d)
            total = total - torch.logsumexp(torch.cat([rest, weighted]), dim=0)
        total = total + group.sum()
    loss = -total / len(levels)
    return loss + l2 * scores.pow(2).mean() if l2 else loss


RANKING_LOSSES = {"pairwise": kway_loss, "listwise": listwise_loss}


def pair_outcomes(scores: torch.Tensor, ranks: list[int]) -> tuple[float, int]:
    """(correctly ordered pairs, pairs) of one ranking; equal scores count half."""
    ranks_t = torch.as_tensor(ranks, device=scores.device)
    better = ranks_t.unsqueeze(1) < ranks_t.unsqueeze(0)
    margins = (scores.unsqueeze(1) - scores.unsqueeze(0))[better]
    return float((margins > 0).sum() + 0.5 * (margins == 0).sum()), int(better.sum())


def collate_rankings(
    tokenizer: PreTrainedTokenizerBase, rankings: list[RankingExample], max_length: int
) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """Stacks every completion of the rankings into one right-padded batch; returns it and each ranking's rows."""
    sequences: list[list[int]] = []
    spans: list[slice] = []
    for ranking in rankings:
        start = len(sequences)
        for completion in ranking.completions:
            prompt_ids, completion_ids = encode_pair(tokenizer, ranking.prompt, completion, max_length)
            sequences.append(prompt_ids + completion_ids)
        spans.append(slice(start, len(sequences)))
    input_ids, attention_mask = pad_right(sequences, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, spans


def ranking_losses(
    rm: nn.Module, tokenizer: PreTrainedTokenizerBase, rankings: list[RankingExample], config: RMConfig
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Forward all completions of the rankings once; returns (summed loss, scores, correct pairs, pairs)."""
    batch, spans = collate_rankings(tokenizer, rankings, config.max_length)
    device = next(rm.parameters()).device
    scores = rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
    loss = scores.sum() * 0.0
    correct, pairs = 0.0, 0
    for ranking, span in zip(rankings, spans, strict=True):
        loss = loss + RANKING_LOSSES[config.loss](scores[span], ranking.ranks, config.score_l2)
        ok, n = pair_outcomes(scores[span].detach(), ranking.ranks)
        correct, pairs = correct + ok, pairs + n
    return loss, scores.detach(), correct, pairs


@torch.no_grad()
def evaluate_rankings(
    rm: nn.Module, tokenizer: PreTrainedTokenizerBase, rankings: list[RankingExample], config: RMConfig
) -> dict[str, Any]:
    """Held-out loss, pairwise accuracy, and accuracy on each labeler's rankings (their agreement with the RM)."""
    was_training = rm.training
    rm.eval()
    loss_sum, correct, pairs = 0.0, 0.0, 0
    by_labeler: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start in range(0, len(rankings), config.eval_batch_size):
        chunk = rankings[start : start + config.eval_batch_size]
        loss, scores, _, _ = ranking_losses(rm, tokenizer, chunk, config)
        loss_sum += float(loss)
        offset = 0
        for ranking in chunk:
            ok, n = pair_outcomes(scores[offset : offset + len(ranking.ranks)], ranking.ranks)
            offset += len(ranking.ranks)
            correct, pairs = correct + ok, pairs + n
            if ranking.labeler is not None:
                by_labeler[ranking.labeler][0] += ok
                by_labeler[ranking.labeler][1] += n
    rm.train(was_training)
    return {
        "loss": loss_sum / max(len(rankings), 1),
        "accuracy": correct / pairs if pairs else None,
        "pairs": pairs,
        "labeler_agreement": {who: ok / n for who, (ok, n) in sorted(by_labeler.items()) if n},
        "labeler_pairs": {who: n for who, (_, n) in sorted(by_labeler.items()) if n},
    }


@torch.no_grad()
def score_completions(
    rm: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[PromptInput],
    completions: list[str],
    batch_size: int = 16,
) -> list[float]:
    """Rewards of (prompt, completion) pairs, offset applied."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        sequences = [
            list(chain(*encode_pair(tokenizer, p, c, rm.max_length)))
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True)
        ]
        input_ids, attention_mask = pad_right(sequences, tokenizer.pad_token_id)
        scores += rm(input_ids.to(device), attention_mask.to(device)).float().tolist()
    rm.train(was_training)
    return scores


def train_rm(
    base_model_path: str | Path,
    train: list[RankingExample],
    valid: list[RankingExample],
    config: RMConfig | None,
    out_dir: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | None = None,
    demonstrations: Sequence[tuple[PromptInput, str]] | None = None,
) -> dict[str, Any]:
    """Trains a reward model on rankings from the causal LM at base_model_path, normalises it, saves it to out_dir."""
    config = config or RMConfig()
    # All-tie rankings yield no pair: they would cost K forward rows and teach nothing.
    usable = [r for r in train if r.n_pairs]
    valid = [r for r in valid if r.n_pairs]
    if not usable:
        raise ValueError("reward-model training needs at least one ranking with two different ranks")
    accelerator = make_accelerator(config.device, config.mixed_precision)
    seed_everything(config.seed)
    lm, tokenizer = load_model(base_model_path, str(accelerator.device), weights_dtype(config, accelerator.device))
    rm = RewardModel.from_causal_lm(lm, max_length=config.max_length).to(accelerator.device)
    del lm
    # The memory options apply to the body; the scalar head always trains, in fp32.
    rm.backbone = prepare_for_training(cast(PreTrainedModel, rm.backbone), config, task_type=None)
    disable_dropout(rm)

    steps_per_epoch = math.ceil(len(usable) / config.rankings_per_step)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(adamw(rm.named_parameters(), config.learning_rate, config.weight_decay))
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    history: dict[str, Any] = {"step": 0, "epoch_losses": [], "train_loss_curve": [], "valid_curve": []}
    data_id = fingerprint(
        [str(base_model_path), [asdict(r) for r in train], [asdict(r) for r in valid], demonstrations]
    )
    state = load_checkpoint(checkpoint_dir, config, data_id)
    if state is not None:
        load_trainable_state(rm, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        set_rng_state(state["rng"])
    else:
        history["initial_valid"] = evaluate_rankings(rm, tokenizer, valid, config) if valid else None
    model, optimizer = accelerator.prepare(rm, optimizer)

    model.train()
    while history["step"] < total_steps:
        step = history["step"]
        epoch, first = divmod(step, steps_per_epoch)
        for batch in shuffled_batches(len(usable), config.rankings_per_step, config.seed, epoch)[first:]:
            shard = batch[accelerator.process_index :: accelerator.num_processes]
            step_loss, correct, pairs, rows = 0.0, 0.0, 0, 0
            for micro in micro_batches(shard, config.rankings_per_micro_batch):
                rankings = [usable[i] for i in micro]
                with accelerator.autocast():
                    loss, _, ok, n = ranking_losses(model, tokenizer, rankings, config)
                # Each ranking counts once in the step's mean, whatever its K.
                accelerator.backward(loss * accelerator.num_processes / len(batch))
                step_loss, correct, pairs = step_loss + loss.item(), correct + ok, pairs + n
                rows += sum(len(r.completions) for r in rankings)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
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
                    result = evaluate_rankings(rm, tokenizer, valid, config)
                    history["valid_curve"].append(result)
                    metrics.update(valid_loss=result["loss"], valid_accuracy=result["accuracy"])
            if checkpoint_dir and accelerator.is_main_process and (epoch_done or step % config.checkpoint_every == 0):
                save_checkpoint(
                    checkpoint_dir,
                    {
                        "model": trainable_state(rm),
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

    # Shift rewards so the reference set scores 0 on average: demonstrations
    # are what a good policy writes, so PPO's rewards start near 0 for SFT.
    if demonstrations:
        reference, normalised_on = demonstrations, "demonstrations"
    else:
        reference = [(r.prompt, c) for r in usable for c in r.completions]
        normalised_on = "training_completions"
    rm.reward_offset = 0.0
    prompts, completions = [p for p, _ in reference], [c for _, c in reference]
    raw = score_completions(rm, tokenizer, prompts, completions, config.eval_batch_size)
    rm.reward_offset = sum(raw) / len(raw)

    final = history["valid_curve"][-1] if history["valid_curve"] else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter_base = str(base_model_path) if config.lora_r and config.lora_save == "adapter" else None
        rm.save(out_dir, tokenizer, adapter_base=adapter_base)
    curve = history["train_loss_curve"]
    initial = history.get("initial_valid")
    return {
        "train_loss": curve[-1] if curve else None,
        "train_loss_curve": curve,
        "valid_loss": final["loss"] if final else None,
        "valid_accuracy": final["accuracy"] if final else None,
        "valid_accuracy_curve": [v["accuracy"] for v in history["valid_curve"]],
        "initial_valid_accuracy": initial["accuracy"] if initial else None,
        "valid_pairs": final["pairs"] if final else 0,
        "labeler_agreement": final["labeler_agreement"] if final else {},
        "labeler_pairs": final["labeler_pairs"] if final else {},
        "reward_offset": rm.reward_offset,
        "normalised_on": normalised_on,
        "steps": history["step"],
        "n_train": len(usable),
        "n_train_all_ties": len(train) - len(usable),
        "n_valid": len(valid),
        # How the version is saved: "full" weights, a LoRA adapter "merged" into them, or the "adapter" alone.
        "saved_as": config.lora_save if config.lora_r else "full",
    }
