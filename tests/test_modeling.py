"""Tests for the model layer, batched sampling and world pretraining, on tiny CPU models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.training.configs import SFTConfig
from app.world.corpus import corpus
from tests.conftest import ROOT
from worker import generate
from worker.adapters import prepare_for_training
from worker.generate import sample_completions, sample_one_at_a_time
from worker.modeling import (
    PROMPT_TEMPLATE,
    format_completion,
    format_prompt,
    load_model,
    save_model,
    saved_format,
    tiny_causal_lm,
)
from worker.world_model import pretrain_base, train_tokenizer

PROMPTS = ["What is 17 + 25?", "Reverse the word 'lantern'.", "Who is the mayor of Brindle?"]
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(300, seed=0), vocab_size=300)


@pytest.fixture
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


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": " 4 "},
    {"role": "user", "content": "And doubled?"},
]


def test_format_prompt_renders_a_conversation_as_a_plain_transcript_or_through_the_chat_template(tokenizer):
    # A one-message conversation is byte-identical to the single-turn template the shipped model learnt.
    for text in PROMPTS:
        assert format_prompt(tokenizer, [{"role": "user", "content": text}]) == PROMPT_TEMPLATE.format(prompt=text)
    assert (
        format_prompt(tokenizer, CONVERSATION)
        == "Answer briefly.\n\nWhat is 2 + 2?\n\nAnswer: 4\n\nAnd doubled?\n\nAnswer:"
    )
    with pytest.raises(ValueError, match="ends with a user message"):
        format_prompt(tokenizer, CONVERSATION[:3])
    chat = train_tokenizer(corpus(50, seed=0), vocab_size=280)
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert format_prompt(chat, CONVERSATION) == (
        "<system>Answer briefly.</system><user>What is 2 + 2?</user><assistant> 4 </assistant>"
        "<user>And doubled?</user><assistant>"
    )


def test_training_examples_of_a_conversation_learn_the_reply_only(tokenizer):
    from worker.common import encode_prompt
    from worker.train_sft import build_example

    example = build_example(tokenizer, CONVERSATION, "8", 256)
    prompt_ids = encode_prompt(tokenizer, CONVERSATION)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert tokenizer.decode(prompt_ids).endswith("And doubled?\n\nAnswer:")


def test_sampling_takes_conversations(saved):
    model, tok = load_model(saved[0], device="cpu")
    single = [[{"role": "user", "content": p}] for p in PROMPTS]
    settings = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 3}
    assert sample_completions(model, tok, single, 4, **settings) == sample_completions(
        model, tok, PROMPTS, 4, **settings
    )
    (out,) = sample_completions(model, tok, [CONVERSATION], 4, **settings)
    assert len(out) == 4 and all(isinstance(c, str) for c in out)


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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("adapter_only", [False, True], ids=["merged", "adapter"])
def test_lora_trains_adapters_only_and_saves_a_model_that_loads(saved, tmp_path, adapter_only):
    model, tok = load_model(saved[0], device="cpu")
    lora = prepare_for_training(model, SFTConfig(lora_r=4, lora_dropout=0.0))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero; move it so merging changes weights
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora.eval()(ids).logits
    path = save_model(lora, tok, tmp_path / "saved", adapter_only=adapter_only)
    assert (path / "adapter_config.json").exists() is adapter_only
    assert saved_format(path) == ("adapter" if adapter_only else "merged")
    if not adapter_only:  # a merged version is a plain model: transformers loads it without peft
        plain = AutoModelForCausalLM.from_pretrained(path)
        assert not any("lora_" in n for n, _ in plain.named_parameters())
    merged, _ = load_model(path, device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    # The training model keeps its adapters after saving.
    assert any("lora_" in n for n, _ in lora.named_parameters())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretrain_base_learns_the_world(tmp_path):
    metrics = pretrain_base(tmp_path / "world", steps=40, seed=0, progress=False, n_docs=1000, batch_size=8)
    json.dumps(metrics)  # metrics are plain data the CLI can print
    assert metrics["final_held_out_loss"] < metrics["initial_held_out_loss"] - 1.0
    model, _tok = load_model(metrics["path"], device="cpu")
    assert model.num_parameters() == metrics["parameters"]
    from worker.modeling import RECIPE_FILE
    from worker.world_model import WORLD_RECIPE

    # The recipe goes with the model, and the shipped model's file is the same recipe.
    written = json.loads((tmp_path / "world" / RECIPE_FILE).read_text())
    shipped = json.loads((ROOT / "models" / "world-base" / RECIPE_FILE).read_text())
    assert written == shipped == json.loads(json.dumps(WORLD_RECIPE))


# --- the training recipe shipped beside a base model ------------------------------------------


def test_the_shipped_world_recipe_names_only_real_settings():
    # config_from_dict drops unknown keys silently, so a misspelt setting would be ignored without a word.
    from dataclasses import fields

    from worker.modeling import load_recipe
    from worker.train_ppo import PPOConfig
    from worker.train_rm import RMConfig
    from worker.train_sft import SFTConfig

    recipe = load_recipe(ROOT / "models" / "world-base")
    assert set(recipe) == {"sft", "rm", "ppo"}
    for kind, config in (("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig)):
        names = {f.name for f in fields(config)}
        assert recipe[kind] and set(recipe[kind]) <= names, set(recipe[kind]) - names
        config(**recipe[kind])  # and every value is accepted
    assert load_recipe(ROOT / "tests") == {}  # no recipe file: nothing to apply


def test_runs_take_the_recipe_of_their_base_model_under_their_own_params(db, tmp_path):
    from app.registry.versions import base_of, register_version
    from worker.jobs import _with_recipe
    from worker.modeling import RECIPE_FILE

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / RECIPE_FILE).write_text(
        json.dumps(
            {
                "about": "settings for this model",
                "sft": {"learning_rate": 1e-3, "epochs": 6},
                "ppo": {"kl_coef": 0.1},
            }
        )
    )
    base = register_version(db, kind="base", name="base-r", artifact_path=str(base_dir))
    sft = register_version(db, kind="sft", name="sft-r", artifact_path=str(tmp_path / "sft"), parent_id=base.id)
    rm = register_version(db, kind="rm", name="rm-r", artifact_path=str(tmp_path / "rm"), parent_id=sft.id)
    plain = register_version(db, kind="base", name="base-plain", artifact_path=str(tmp_path / "plain"))
    assert base_of(db, rm).id == base.id and base_of(db, base).id == base.id

    assert _with_recipe(db, base, "sft", {}) == {"learning_rate": 1e-3, "epochs": 6}
    assert _with_recipe(db, base, "sft", {"epochs": 1}) == {"learning_rate": 1e-3, "epochs": 1}  # the run wins
    assert _with_recipe(db, sft, "ppo", {"steps": 2}) == {"kl_coef": 0.1, "steps": 2}  # found through the parent
    assert _with_recipe(db, rm, "rm", {"epochs": 3}) == {"epochs": 3}  # the recipe has no rm part
    assert _with_recipe(db, plain, "sft", {"epochs": 2}) == {"epochs": 2}  # a base without a recipe
