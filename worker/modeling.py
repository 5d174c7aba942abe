"""The model layer shared by sampling and every trainer (SFT, reward model, PPO).

It loads any Hugging Face causal LM (local path or hub id) with its tokenizer,
saves model versions atomically, turns a prompt from the database into the text
the model sees (the tokenizer's chat template, or a plain template for base
models such as the bundled world model), and builds the tiny models used by the
tests and by world pretraining. Trainers and samplers go through these
functions so that a model written by one stage loads unchanged in the next.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.conversations import PromptInput
from worker.adapters import is_peft, merged_state_dict

# Plain template for tokenizers without a chat template. The world corpus never
# contains "Answer:", so a base model pretrained on it does not know what to do
# after this marker: it continues text, and SFT is what teaches it to answer.
PROMPT_TEMPLATE = "{prompt}\n\nAnswer:"
# A conversation without a chat template is a plain transcript built from the same
# template, so a one-message conversation renders exactly as PROMPT_TEMPLATE: a
# system message is a first paragraph, each user turn is followed by "Answer:",
# and each assistant turn is that answer (" " + reply, as format_completion writes
# it), turns separated by a blank line. For system S, user U1, assistant A1, user U2:
#     "S\n\nU1\n\nAnswer: A1\n\nU2\n\nAnswer:"
SYSTEM_TEMPLATE = "{system}\n\n"
ASSISTANT_TEMPLATE = " {reply}\n\n"
# Trainer settings measured for a base model, shipped beside its weights: {"sft": {...}, "rm": {...}, "ppo": {...}}.
RECIPE_FILE = "training_recipe.json"
# What peft writes beside a LoRA adapter saved alone.
ADAPTER_CONFIG = "adapter_config.json"
# Where model configs keep their context window, by architecture.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")

_Tokenizer = TypeVar("_Tokenizer", bound=PreTrainedTokenizerBase)


def default_device() -> str:
    """Returns "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_for(device: str) -> torch.dtype:
    # bf16 halves memory and is fast on GPUs that have it; CPU kernels are
    # faster and more exact in fp32.
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def prepare_tokenizer(tokenizer: _Tokenizer) -> _Tokenizer:
    """Gives the tokenizer a pad token (the EOS token if it has none) and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only models generate after the last prompt token, so prompts of
    # different lengths must be padded on the left.
    tokenizer.padding_side = "left"
    return tokenizer


def _sync_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_model(
    path_or_id: str | Path, device: str | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer (bf16 on CUDA when available, fp32 on CPU, unless dtype says).

    A folder holding a LoRA adapter saved alone (adapter_config.json) loads on its base, merged.
    """
    device = device or default_device()
    dtype = dtype or _dtype_for(device)
    source = str(path_or_id)
    local = Path(source).is_absolute() or source.startswith(".")
    if local:
        # transformers would take a missing folder for a malformed hub id, and an emptied one for a
        # tokenizer it cannot convert; say what is wrong with the folder instead.
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model folder {source} does not exist")
        if not (Path(source) / "config.json").is_file() and not (Path(source) / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"model folder {source} holds no saved model (no config.json)")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    if local and (Path(source) / ADAPTER_CONFIG).is_file():
        from peft import AutoPeftModelForCausalLM

        adapted = AutoPeftModelForCausalLM.from_pretrained(source, dtype=dtype)
        model = cast(PreTrainedModel, adapted.merge_and_unload())
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    # PreTrainedModel.to is wrapped with functools.wraps, which typeshed types as an unbound function.
    cast(torch.nn.Module, model).to(device)
    _sync_special_ids(model, tokenizer)
    return model, tokenizer


def context_length(config: Any) -> int | None:
    """A model's context window in tokens, from its config; None when the config does not say."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def saved_context_length(path_or_id: str | Path) -> int | None:
    """The context window of a saved model, or of the base of an adapter saved alone; reads configs only."""
    from transformers import AutoConfig

    source = str(path_or_id)
    if (Path(source) / ADAPTER_CONFIG).is_file():
        from peft import PeftConfig

        source = PeftConfig.from_pretrained(source).base_model_name_or_path
    elif Path(source).is_absolute() and not (Path(source) / "config.json").is_file():
        return None  # no saved model there: loading it says what is wrong
    return context_length(AutoConfig.from_pretrained(source))


def load_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    """The trainer settings shipped beside a model (RECIPE_FILE), per run kind; {} when it has none."""
    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        return {}
    recipe = json.loads(file.read_text())
    return {kind: dict(values) for kind, values in recipe.items() if isinstance(values, dict)}


def save_recipe(path: str | Path, recipe: dict[str, Any]) -> Path:
    """Writes trainer settings beside a saved model (RECIPE_FILE), for load_recipe."""
    file = Path(path) / RECIPE_FILE
    file.write_text(json.dumps(recipe, indent=2) + "\n")
    return file


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, *, adapter_only: bool = False
) -> Path:
    """Saves model and tokenizer to `path` atomically (temp dir beside it, then rename).

    A LoRA model is saved merged (it loads with plain AutoModelForCausalLM.from_pretrained), or with
    adapter_only as its active adapter alone, which peft (and load_model) loads on the base it names.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    # Gradient checkpointing switches the KV cache off; the saved model generates with it.
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True
    try:
        if is_peft(model) and adapter_only:
            model.save_pretrained(tmp, selected_adapters=[model.active_adapter])
        elif is_peft(model):
            base = cast(PreTrainedModel, cast(Any, model).get_base_model())
            base.save_pretrained(tmp, state_dict=merged_state_dict(model), safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            # os.replace cannot replace a non-empty directory, so move the old
            # version aside first; readers never see a half-written directory.
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config.use_cache = use_cache
    return target


def saved_format(path: str | Path) -> str:
    """'adapter' for a folder holding a LoRA adapter alone, else 'merged' (a plain model)."""
    return "adapter" if (Path(path) / ADAPTER_CONFIG).is_file() else "merged"


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: PromptInput) -> str:
    """Turns a prompt (a text or a conversation) into model input: the chat template if any, else a transcript."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        # With tokenize=False the template renders to text; transformers types every return mode at once.
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return plain_transcript(messages)


def plain_transcript(messages: list[dict[str, str]]) -> str:
    """Renders a conversation for a model without a chat template (see PROMPT_TEMPLATE and the lines after it)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a conversation to answer ends with a user message")
    parts: list[str] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(SYSTEM_TEMPLATE.format(system=content))
        elif role == "user":
            parts.append(PROMPT_TEMPLATE.format(prompt=content))
        else:
            parts.append(ASSISTANT_TEMPLATE.format(reply=content.strip()))
    return "".join(parts)


def format_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> str:
    """Returns the target text a trainer appends after format_prompt: " " + completion + EOS."""
    # The leading space matches how the plain template ends ("Answer:") and how
    # sampled completions begin; generation strips it again.
    eos = tokenizer.eos_token or ""
    sep = "" if getattr(tokenizer, "chat_template", None) else " "
    return f"{sep}{completion.strip()}{eos}"


def adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether to let the tokenizer add special tokens (False when a chat template already did)."""
    return not getattr(tokenizer, "chat_template", None)


def tiny_causal_lm(tokenizer: PreTrainedTokenizerBase, seed: int | None = None, **overrides: Any) -> PreTrainedModel:
    """Builds a tiny Llama-style causal LM (about 1-2 M parameters) for tests and the world."""
    if seed is not None:
        torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    settings.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    _sync_special_ids(model, tokenizer)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Counts the model's parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
