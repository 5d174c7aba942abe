"""Supervised fine-tuning on a tiny character-level model: the loss mask, learning, and exact resumption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.tiny_lm import char_tokenizer, one_torch_thread, save_tiny_model
from worker.common import encode_completion, encode_prompt, make_accelerator
from worker.train_sft import (
    IGNORE_INDEX,
    SFTConfig,
    build_example,
    collate,
    response_loss_sum,
    train_sft,
    validation_loss,
)

WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "rose"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sft") / "base")


def demonstrations(n: int, seed: int) -> list[tuple[str, str]]:
    """'Repeat X' -> 'X X': the answer is fully determined by the prompt."""
    rng = random.Random(seed)
    return [(f"Repeat {w}", f"{w} {w}") for w in (rng.choice(WORDS) for _ in range(n))]


def test_build_example_masks_exactly_the_prompt() -> None:
    tokenizer = char_tokenizer()
    example = build_example(tokenizer, "Repeat red", "red red", max_length=128)
    prompt_ids = encode_prompt(tokenizer, "Repeat red")
    completion_ids = encode_completion(tokenizer, "red red")
    assert example["input_ids"] == prompt_ids + completion_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    # The completion is " red red" (format_completion's leading space) and ends with EOS.
    assert tokenizer.decode(completion_ids[:-1]) == " red red"
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt_ids) == "Repeat red\n\nAnswer:"


def test_truncation_keeps_the_end_of_the_prompt() -> None:
    tokenizer = char_tokenizer()
    example = build_example(tokenizer, "x" * 100 + " Repeat red", "red red", max_length=40)
    assert len(example["input_ids"]) == 40
    prompt_len = example["labels"].count(IGNORE_INDEX)
    assert tokenizer.decode(example["input_ids"][:prompt_len]).endswith("Repeat red\n\nAnswer:")
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_loss_counts_only_response_tokens(base_model: Path) -> None:
    from worker.modeling import load_model

    model, tokenizer = load_model(base_model, device="cpu")
    examples = [build_example(tokenizer, p, c, 128) for p, c in [("Repeat red", "red red"), ("Repeat teal", "teal")]]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss, count = response_loss_sum(model, batch)
    # " red red</s>" is 9 tokens and " teal</s>" 6; the first of each is predicted from the prompt's last token.
    assert count == 9 + 6
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = 0.0
    for row, example in enumerate(examples):
        start = example["labels"].count(IGNORE_INDEX)
        for pos in range(start, len(example["input_ids"])):
            expected -= torch.log_softmax(logits[row, pos - 1], -1)[example["input_ids"][pos]].item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_validation_loss_falls_and_best_epoch_is_saved(base_model: Path, tmp_path: Path) -> None:
    config = SFTConfig(epochs=5, learning_rate=1e-2, batch_size=8, warmup_ratio=0.1, seed=1, device="cpu")
    seen: list[tuple[int, int, dict]] = []
    metrics = train_sft(
        base_model,
        demonstrations(48, 0),
        demonstrations(16, 1),
        config,
        tmp_path / "sft",
        progress=lambda step, total, m: seen.append((step, total, m)),
    )
    assert metrics["n_train"] == 48 and metrics["steps"] == 30 and metrics["epochs_run"] == 5
    assert [s for s, _, _ in seen] == list(range(1, 31)) and {t for _, t, _ in seen} == {30}
    assert len(metrics["valid_loss_curve"]) == 5
    assert metrics["valid_loss"] == min(metrics["valid_loss_curve"])
    assert metrics["valid_loss"] < 0.5 * metrics["initial_valid_loss"]
    assert metrics["train_loss_curve"][-1] < metrics["train_loss_curve"][0]
    assert (tmp_path / "sft" / "config.json").exists() and (tmp_path / "sft" / "tokenizer.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_early_stopping_keeps_the_best_epoch(base_model: Path, tmp_path: Path) -> None:
    from worker.modeling import load_model

    # Validation answers contradict training answers: once the model learns the
    # training pairs, validation loss rises and training stops.
    train = [(f"Repeat {w}", f"{w} {w}") for w in WORDS] * 2
    valid = [(f"Repeat {w}", "QZ QZ") for w in WORDS]
    config = SFTConfig(epochs=12, learning_rate=1e-2, batch_size=4, early_stopping_patience=2, seed=0, device="cpu")
    metrics = train_sft(base_model, train, valid, config, tmp_path / "sft")
    curve = metrics["valid_loss_curve"]
    assert metrics["stopped_early"] and metrics["epochs_run"] < 12
    assert metrics["best_epoch"] == metrics["epochs_run"] - 2  # two epochs without improvement
    assert metrics["valid_loss"] == min(curve) < curve[-1]
    model, tokenizer = load_model(tmp_path / "sft", device="cpu")
    examples = [build_example(tokenizer, p, c, 128) for p, c in valid]
    # The saved weights are the best epoch's, not the last one's.
    assert validation_loss(model, examples, tokenizer.pad_token_id, 16) == pytest.approx(
        metrics["valid_loss"], rel=1e-5
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("memory", [{}, {"lora_r": 4, "gradient_checkpointing": True}], ids=["full", "lora"])
def test_killed_run_resumes_to_the_same_weights(base_model: Path, tmp_path: Path, memory: dict) -> None:
    config = SFTConfig(
        epochs=2,
        learning_rate=3e-3,
        batch_size=4,
        micro_batch_size=2,
        seed=3,
        checkpoint_every=2,
        device="cpu",
        **memory,
    )
    train, valid = demonstrations(12, 2), demonstrations(4, 3)
    full = train_sft(base_model, train, valid, config, tmp_path / "full")

    def kill_at_step_5(step: int, total: int, metrics: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_sft(
            base_model,
            train,
            valid,
            config,
            tmp_path / "resumed",
            checkpoint_dir=tmp_path / "ckpt",
            progress=kill_at_step_5,
        )
    assert not (tmp_path / "resumed").exists()
    resumed_steps: list[int] = []
    resumed = train_sft(
        base_model,
        train,
        valid,
        config,
        tmp_path / "resumed",
        checkpoint_dir=tmp_path / "ckpt",
        progress=lambda step, total, m: resumed_steps.append(step),
    )
    # The checkpoint of step 4 survived the kill, so the run redoes step 5 onwards.
    assert resumed_steps == [5, 6]
    assert resumed == full
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="other settings"):
        train_sft(
            base_model,
            train,
            valid,
            SFTConfig(epochs=3, seed=3, device="cpu"),
            tmp_path / "x",
            checkpoint_dir=tmp_path / "ckpt",
        )


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_lora_sft_learns_keeps_the_best_epoch_and_saves_as_asked(tmp_path: Path, save: str) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from worker.modeling import load_model, saved_format

    # A pretrained base: on random weights (frozen norms and embeddings) adapters can hardly move the logits.
    base_model = ROOT / "models" / "world-base"
    train = [(f"Repeat {w}", f"{w} {w}") for w in WORDS] * 2
    valid = [(f"Repeat {w}", "QZ QZ") for w in WORDS]
    config = SFTConfig(
        epochs=12,
        learning_rate=1e-2,
        batch_size=4,
        early_stopping_patience=2,
        seed=0,
        device="cpu",
        lora_r=8,
        lora_target_modules="all-linear",
        lora_save=save,
    )
    metrics = train_sft(base_model, train, valid, config, tmp_path / "sft")
    assert metrics["train_loss_curve"][-1] < 0.5 * metrics["train_loss_curve"][0]  # adapters alone learn
    assert metrics["stopped_early"] and metrics["best_epoch"] == metrics["epochs_run"] - 2
    assert saved_format(tmp_path / "sft") == save
    if save == "merged":
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")  # no peft needed
        assert not any("lora_" in n for n, _ in plain.named_parameters())
    else:
        adapted = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "sft")
        assert sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n) > 0
    model, tokenizer = load_model(tmp_path / "sft", device="cpu")
    examples = [build_example(tokenizer, p, c, 128) for p, c in valid]
    # The saved adapter is the best epoch's, not the last one's.
    assert validation_loss(model, examples, tokenizer.pad_token_id, 16) == pytest.approx(
        metrics["valid_loss"], rel=1e-4
    )


def test_trainers_in_one_process_may_use_different_accelerator_settings() -> None:
    # A Celery worker runs SFT, RM and PPO one after another with their own settings.
    assert make_accelerator("cpu", "no").mixed_precision == "no"
    assert make_accelerator("cpu", "bf16").mixed_precision == "bf16"
    assert make_accelerator(None, "no").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
