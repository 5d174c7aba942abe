"""A character-level tokenizer and a tiny causal LM for the trainer tests: built here, never downloaded."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from worker.modeling import save_model, tiny_causal_lm


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ASCII letters, digits and punctuation."""
    chars = list(string.ascii_letters + string.digits + " .,:;!?'-\n")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_model(directory: Path) -> Path:
    """Builds the tiny test model with the character tokenizer and saves it under `directory`."""
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(
        tokenizer,
        seed=0,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return save_model(model, tokenizer, directory)


def one_torch_thread():
    """Generator for a module fixture: tiny matrices gain nothing from threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
