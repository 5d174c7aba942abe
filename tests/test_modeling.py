"""Tests for the model layer, batched sampling and world pretraining, on tiny CPU models."""

from __future__ import annotations

import json

import pytest
import torch

from app.world.corpus import corpus
from worker import generate
from worker.generate import sample_completions, sample_one_at_a_time
from worker.modeling import (
    PROMPT_TEMPLATE,
    apply_lora,
    format_completion,
    format_prompt,
    load_model,
    save_model,
    tiny_causal_lm,
)
from worker.world_model import pretrain_base, train_tokenizer

PROMPTS = ["What is 17 + 25?", "Reverse the word 'lantern'.", "Who is the mayor of Brindle?"]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(300, seed=0), vocab_size=300)


@pytest.fixture()
def saved(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer, seed=0, **SMALL)
    return save_model(model, tokenizer, tmp_path / "base"), model


def test_tokenizer_has_special_tokens_and_round_trips(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "The river in Brindle runs silver. 17 + 25 = 42."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Digits are tokens of their own, which keeps sums learnable.
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokenizer.tokenize("12345"))


def test_save_then_load_by_path_gives_the_same_model(saved, tmp_path):
    path, model = saved
    loaded, tok = load_model(path, device="cpu")
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    assert loaded.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits, atol=1e-6)
    # Saving again over an existing version replaces it and leaves no temp dirs.
    save_model(loaded, tok, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert (path / "model.safetensors").exists()


def test_format_prompt_uses_plain_template_or_chat_template(tokenizer):
    assert format_prompt(tokenizer, "Hi?") == PROMPT_TEMPLATE.format(prompt="Hi?")
    assert format_completion(tokenizer, " 42 ") == " 42<|endoftext|>"
    copy = train_tokenizer(corpus(50, seed=0), vocab_size=280)
    copy.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    assert format_prompt(copy, "Hi?") == "<user>Hi?</user><bot>"


def test_sample_completions_gives_k_distinct_one_line_strings(saved):
    model, tok = load_model(saved[0], device="cpu")
    out = sample_completions(model, tok, PROMPTS, 5, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    assert len(out) == len(PROMPTS)
    for completions in out:
        assert len(completions) == 5 and len(set(completions)) == 5
        assert all(c and "\n" not in c and c == c.strip() for c in completions)
    again = sample_completions(model, tok, PROMPTS, 5, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    assert again == out
    small_batches = sample_completions(
        model, tok, PROMPTS, 5, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=4, seed=1
    )
    assert [len(set(c)) for c in small_batches] == [5, 5, 5]


def test_sample_one_at_a_time_matches_the_batched_contract(saved):
    model, tok = load_model(saved[0], device="cpu")
    out = sample_one_at_a_time(model, tok, PROMPTS[:2], 4, temperature=1.0, max_new_tokens=8, seed=0)
    assert [len(set(c)) for c in out] == [4, 4]


def test_duplicates_are_resampled_only_up_to_the_bound(saved, monkeypatch):
    model, tok = load_model(saved[0], device="cpu")
    calls = []
    real = generate._generate_rows

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_generate_rows", counting)
    # Greedy decoding repeats itself, so every resample round finds duplicates.
    out = sample_completions(model, tok, PROMPTS[:2], 4, temperature=0.0, max_new_tokens=6, max_resample_tries=2)
    assert calls == [8, 6, 6]
    assert all(len(c) == 4 and len(set(c)) == 1 for c in out)


def test_loaded_model_trains(saved):
    model, tok = load_model(saved[0], device="cpu")
    text = format_prompt(tok, PROMPTS[0]) + format_completion(tok, "42")
    batch = tok([text], return_tensors="pt")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_lora_trains_adapters_only_and_saves_a_plain_model(saved, tmp_path):
    model, tok = load_model(saved[0], device="cpu")
    lora = apply_lora(model, r=4)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero; move it so merging changes weights
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora.eval()(ids).logits
    path = save_model(lora, tok, tmp_path / "merged")
    assert not (path / "adapter_config.json").exists()
    merged, _ = load_model(path, device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    # The training model keeps its adapters after saving.
    assert any("lora_" in n for n, _ in lora.named_parameters())


@pytest.mark.slow
def test_pretrain_base_learns_the_world(tmp_path):
    metrics = pretrain_base(tmp_path / "world", steps=40, seed=0, progress=False, n_docs=1000, batch_size=8)
    json.dumps(metrics)  # metrics are plain data the CLI can print
    assert metrics["final_held_out_loss"] < metrics["initial_held_out_loss"] - 1.0
    model, tok = load_model(metrics["path"], device="cpu")
    assert model.num_parameters() == metrics["parameters"]
