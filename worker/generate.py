"""Samples the K completions per prompt that labelers rank.

The sampling stage of the loop: for each prompt in a batch the current policy
writes K (4..9) completions, which become one ranking task. Prompts are
formatted with `format_prompt`, left-padded and generated together with the
KV cache (`model.generate`), many sequences per forward pass. Exact duplicate
completions within a prompt are useless to a ranker, so they are resampled,
up to a bound. `sample_one_at_a_time` is the naive baseline for the benchmark.

Stop rules: a completion ends at the EOS token, after `max_new_tokens`, and,
when `stop_at_newline` is on, at its first newline (the text after it is
dropped). `stop_at_newline=None` means "on for models without a chat template"
(the bundled world's answers are one line), "off for chat models" (whose
answers may span paragraphs). Completions are returned stripped of
surrounding whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import (
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from worker.modeling import PromptInput, adds_special_tokens, context_length, format_prompt


class _StopAtNewline(StoppingCriteria):
    """Marks a row finished once any generated token contains a newline."""

    def __init__(self, newline_ids: torch.Tensor, prompt_length: int) -> None:
        self.newline_ids = newline_ids
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        # .any() yields a bool tensor; torch types it as a plain Tensor.
        return cast(torch.BoolTensor, torch.isin(generated, self.newline_ids.to(generated.device)).any(dim=1))


def newline_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Ids of every token whose text contains a newline (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_instructloop_newline_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)
        tokenizer._instructloop_newline_ids = cached
    return cached


def _wants_newline_stop(tokenizer: PreTrainedTokenizerBase, stop_at_newline: bool | None) -> bool:
    if stop_at_newline is None:
        return not getattr(tokenizer, "chat_template", None)
    return stop_at_newline


def _generate_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_at_newline: bool,
    use_cache: bool = True,
) -> list[str]:
    """Generates one completion for each already formatted text, in a single batch."""
    tokenizer.padding_side = "left"
    fit: dict[str, Any] = {}
    limit = context_length(model.config)
    if limit is not None:
        # A registered model may have a short context: a longer prompt keeps its end (what the completion
        # follows), and prompt and completion together stay within the positions the model has.
        max_new_tokens = min(max_new_tokens, limit - 1)
        tokenizer.truncation_side = "left"
        fit = {"truncation": True, "max_length": limit - max_new_tokens}
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, add_special_tokens=adds_special_tokens(tokenizer), **fit
    ).to(model.device)
    prompt_length = enc["input_ids"].shape[1]
    stopping = StoppingCriteriaList()
    if stop_at_newline:
        stopping.append(_StopAtNewline(newline_token_ids(tokenizer), prompt_length))
    sampling = temperature > 0
    # Causal LMs mix in GenerationMixin; transformers 5 no longer declares `generate` on PreTrainedModel.
    out = cast(GenerationMixin, model).generate(
        **enc,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,  # only top_p truncates, not the library's default top_k=50
        max_new_tokens=max_new_tokens,
        stopping_criteria=stopping,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=use_cache,
    )
    decoded = tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    if stop_at_newline:
        decoded = [d.split("\n", 1)[0] for d in decoded]
    return [d.strip() for d in decoded]


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[PromptInput],
    k: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    seed: int | None = None,
    max_resample_tries: int = 3,
    stop_at_newline: bool | None = None,
) -> list[list[str]]:
    """Samples k completions per prompt in batches of `batch_size` sequences, resampling duplicates."""
    return _sample(
        model,
        tokenizer,
        prompts,
        k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        rows_per_batch=max(1, batch_size),
        seed=seed,
        max_resample_tries=max_resample_tries,
        stop_at_newline=stop_at_newline,
        use_cache=True,
    )


def sample_one_at_a_time(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[PromptInput],
    k: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    seed: int | None = None,
    max_resample_tries: int = 3,
    stop_at_newline: bool | None = None,
    use_cache: bool = True,
) -> list[list[str]]:
    """Baseline: the same sampling, one prompt and one sequence per generate call."""
    return _sample(
        model,
        tokenizer,
        prompts,
        k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        rows_per_batch=1,
        seed=seed,
        max_resample_tries=max_resample_tries,
        stop_at_newline=stop_at_newline,
        use_cache=use_cache,
    )


def _sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[PromptInput],
    k: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    rows_per_batch: int,
    seed: int | None,
    max_resample_tries: int,
    stop_at_newline: bool | None,
    use_cache: bool,
) -> list[list[str]]:
    if k < 1:
        raise ValueError("k must be at least 1")
    if seed is not None:
        torch.manual_seed(seed)
    formatted = [format_prompt(tokenizer, p) for p in prompts]
    newline_stop = _wants_newline_stop(tokenizer, stop_at_newline)
    distinct: list[list[str]] = [[] for _ in prompts]
    everything: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(1 + max(0, max_resample_tries)):
                # One row per completion still missing; the first round asks for
                # all k, later rounds only for the places duplicates took.
                rows = [i for i in range(len(prompts)) for _ in range(k - len(distinct[i]))]
                if not rows:
                    break
                for start in range(0, len(rows), rows_per_batch):
                    chunk = rows[start : start + rows_per_batch]
                    texts = _generate_rows(
                        model,
                        tokenizer,
                        [formatted[i] for i in chunk],
                        temperature=temperature,
                        top_p=top_p,
                        max_new_tokens=max_new_tokens,
                        stop_at_newline=newline_stop,
                        use_cache=use_cache,
                    )
                    for i, text in zip(chunk, texts, strict=True):
                        everything[i].append(text)
                        # Empty completions are resampled like duplicates: a
                        # blank option is nothing a labeler can rank.
                        if text and text not in distinct[i] and len(distinct[i]) < k:
                            distinct[i].append(text)
    finally:
        model.train(was_training)
    # After the bound, fill with repeats so every prompt still gets k options.
    for i in range(len(prompts)):
        spare = [t for t in everything[i] if t not in distinct[i]] or everything[i] or [""]
        while len(distinct[i]) < k:
            distinct[i].append(spare[len(distinct[i]) % len(spare)])
    return distinct
