"""Validation of a model brought from outside: can the loop sample from it and train it?

`instructloop models register` and `POST /api/v1/models` leave a version
`validating` and queue a `validate` run; this module is that run's work. It
loads the config and tokenizer from the source (at the asked revision),
checks the architecture is one the loop can use for the version's kind,
gives the tokenizer a pad token, loads the weights, checks the tokenizer
fits the embedding and runs one short generation. What it learns becomes
the version's facts; anything wrong raises `ModelInvalid` with a sentence a
person can act on, which fails the run and the version with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from worker.modeling import context_length, default_device, prepare_tokenizer

SAMPLE_PROMPT = "Hello"
SAMPLE_TOKENS = 8


class ModelInvalid(Exception):
    """The source is not a model the loop can use; the message says why."""


def _config(source: str, revision: str | None) -> PretrainedConfig:
    local = Path(source)
    if local.is_absolute() and not local.is_dir():
        raise ModelInvalid(f"model folder {source} does not exist")
    if local.is_absolute() and not (local / "config.json").is_file():
        raise ModelInvalid(f"{source} is not a saved model: it has no config.json")
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except Exception as exc:  # transformers raises OSError, ValueError or KeyError for the same "cannot read"
        raise ModelInvalid(f"cannot read the model config from {source}: {exc}") from exc


def _use_as(config: PretrainedConfig, kind: str) -> str:
    """'causal' or 'classifier': how the loop loads this architecture for this kind; raises when it cannot."""
    model_type = getattr(config, "model_type", None)
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    archs = list(getattr(config, "architectures", None) or [])
    if kind == "rm" and any(a.endswith("ForSequenceClassification") for a in archs):
        if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise ModelInvalid(f"{model_type} sequence classifiers are not supported by transformers")
        if int(getattr(config, "num_labels", 0)) != 1:
            raise ModelInvalid(f"a reward model must have one output label; this one has {config.num_labels}")
        return "classifier"
    has_lm_head = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if not causal or not has_lm_head:
        # BERT-like encoders appear in transformers' causal mapping too; their saved head says what they are.
        what = archs[0] if archs else f"model type '{model_type}'"
        raise ModelInvalid(
            f"{what} is not a causal language model; the loop samples from and trains decoder-only models "
            "(GPT-2, Llama, Qwen2, Mistral, ...)"
            + (" or, for kind rm, a sequence classifier with one label" if kind == "rm" else "")
        )
    return "causal"


def _context_length(config: PretrainedConfig, tokenizer: Any) -> int | None:
    found = context_length(config)
    if found is not None:
        return found
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else None


def validate_model(
    source: str, kind: str, revision: str | None = None, device: str | None = None, pin_to: Path | None = None
) -> dict[str, Any]:
    """Loads and tries a model; returns its facts, or raises ModelInvalid saying what is wrong.

    With pin_to, a model that came from the hub (not a local folder) is saved there once it passed, with
    `pinned` and the hub's `commit` in the facts.
    """
    device = device or default_device()
    config = _config(source, revision)
    use_as = _use_as(config, kind)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except Exception as exc:
        raise ModelInvalid(f"cannot load the tokenizer from {source}: {exc}") from exc
    pad_was_set = tokenizer.pad_token is not None
    try:
        tokenizer = prepare_tokenizer(tokenizer)
    except ValueError as exc:
        raise ModelInvalid(str(exc)) from exc
    auto = AutoModelForSequenceClassification if use_as == "classifier" else AutoModelForCausalLM
    try:
        model = cast(PreTrainedModel, auto.from_pretrained(source, revision=revision))
    except Exception as exc:  # a truncated safetensors file, a missing weights file, shapes that do not fit
        raise ModelInvalid(f"cannot load the weights from {source}: {type(exc).__name__}: {exc}") from exc
    embedding = cast(torch.nn.Embedding, model.get_input_embeddings())
    embedding_rows = int(embedding.weight.shape[0])
    if len(tokenizer) > embedding_rows:
        raise ModelInvalid(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {embedding_rows} rows; "
            "the tokenizer does not belong to this model"
        )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    facts: dict[str, Any] = {
        "architecture": (list(config.architectures or []) or [type(model).__name__])[0],
        "model_type": config.model_type,
        "loads_as": use_as,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "context_length": _context_length(config, tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "pad_token_set": pad_was_set,
        "pad_token": tokenizer.pad_token,
        "vocab_size": int(getattr(config, "vocab_size", 0) or embedding_rows),
        "tokenizer_size": len(tokenizer),
        "revision": revision,
    }
    cast(torch.nn.Module, model).to(device).eval()
    inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt").to(device)
    with torch.no_grad():
        if use_as == "classifier":
            score = model(**inputs).logits[0, 0].item()
            facts["sample_score"] = float(score)
        else:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            out = cast(Any, model).generate(**inputs, max_new_tokens=SAMPLE_TOKENS, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            facts["sample_generation"] = {
                "prompt": SAMPLE_PROMPT,
                "text": tokenizer.decode(new, skip_special_tokens=True),
                "tokens": int(new.shape[0]),
            }
    if pin_to is not None and not Path(source).expanduser().is_dir():
        cast(Any, model).to("cpu").save_pretrained(pin_to, safe_serialization=True)
        tokenizer.save_pretrained(pin_to)
        facts["pinned"] = str(pin_to)
        facts["commit"] = _hub_commit(source, revision)
    return facts


def _hub_commit(source: str, revision: str | None) -> str | None:
    """The hub commit a revision of a model resolved to (its snapshot folder is named after it)."""
    from transformers.utils import cached_file

    try:
        config_file = cached_file(source, "config.json", revision=revision)
    except OSError:
        return None
    snapshot = Path(config_file).parent if config_file else None
    return snapshot.name if snapshot is not None and snapshot.parent.name == "snapshots" else None
