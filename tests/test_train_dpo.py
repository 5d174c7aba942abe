"""DPO on whole rankings (worker/train_dpo.py): log-probabilities, the losses by hand with a tie, learning, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.test_train_rm import keyword_rankings
from tests.tiny_lm import one_torch_thread, save_tiny_model
from worker.modeling import load_model
from worker.train_dpo import DPOConfig, ranking_losses, sequence_logprobs, train_dpo
from worker.train_rm import RankingExample
from worker.train_sft import build_example


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("dpo") / "sft")


def test_sequence_logprobs_sum_each_completions_tokens_whatever_the_padding(policy_path: Path) -> None:
    model, tokenizer = load_model(policy_path, device="cpu")
    ranking = RankingExample("Say one", ["ab", "a much longer answer", "b"], [1, 2, 3])
    with torch.no_grad():
        batched = sequence_logprobs(model, tokenizer, [ranking], 64)
        for row, completion in enumerate(ranking.completions):
            example = build_example(tokenizer, ranking.prompt, completion, 64)
            ids = torch.tensor([example["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            expected = sum(
                logp[pos - 1, ids[0, pos]].item()
                for pos in range(len(example["labels"]))
                if example["labels"][pos] != -100
            )
            assert batched[row].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("loss", ["pairwise", "listwise"])
def test_the_losses_on_implicit_rewards_match_the_formulas_by_hand_with_a_tie(policy_path: Path, loss: str) -> None:
    model, tokenizer = load_model(policy_path, device="cpu")
    ranking = RankingExample("Say one", ["one", "two", "three"], [1, 2, 2])  # "two" and "three" tied
    reference = torch.tensor([-9.0, -7.5, -8.0])
    config = DPOConfig(beta=0.5, loss=loss, max_length=64)
    with torch.no_grad():
        logps = sequence_logprobs(model, tokenizer, [ranking], 64)
        got, [implicit] = ranking_losses(model, tokenizer, [ranking], [reference], config)
    a, b, c = (0.5 * (logps - reference)).tolist()
    assert implicit.tolist() == pytest.approx([a, b, c], rel=1e-5)
    if loss == "pairwise":  # DPO's loss over the two non-tied pairs, averaged
        expected = -(F.logsigmoid(torch.tensor(a - b)) + F.logsigmoid(torch.tensor(a - c))).item() / 2
    else:  # Plackett–Luce: "one" first of three, then {two, three} tied (Efron), over two groups
        e = math.exp
        first = a - math.log(e(a) + e(b) + e(c))
        tie = (b + c) - math.log(e(b) + e(c)) - math.log(0.5 * (e(b) + e(c)))
        expected = -(first + tie) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("loss", ["pairwise", "listwise"])
def test_dpo_learns_the_rankings_preference(policy_path: Path, tmp_path: Path, loss: str) -> None:
    train, valid = keyword_rankings(48, seed=2, k_choices=(4, 6)), keyword_rankings(24, seed=3, k_choices=(4, 6))
    config = DPOConfig(
        epochs=2, learning_rate=3e-3, rankings_per_step=8, rankings_per_micro_batch=4, beta=0.1, loss=loss,
        max_length=64, seed=0, device="cpu",
    )  # fmt: skip
    metrics = train_dpo(policy_path, train, valid, config, tmp_path / "policy")
    assert metrics["initial_valid_accuracy"] == pytest.approx(0.5, abs=0.25)  # the reference: implicit reward 0
    assert metrics["valid_accuracy"] > 0.85 and metrics["valid_margin"] > 0
    assert metrics["train_loss_curve"][-1] < metrics["train_loss_curve"][0]
    assert metrics["forward_rows_per_epoch"] == sum(len(r.completions) for r in train)  # K rows per ranking
    # The policy itself moved: it now prefers "good" completions over the tied rest.
    model, tokenizer = load_model(tmp_path / "policy", device="cpu")
    base, _ = load_model(policy_path, device="cpu")
    probe = RankingExample("Say something 3", ["blue good fish", "blue tree fish"], [1, 2])
    with torch.no_grad():
        after = sequence_logprobs(model, tokenizer, [probe], 64)
        before = sequence_logprobs(base, tokenizer, [probe], 64)
    assert (after[0] - before[0]) - (after[1] - before[1]) > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("memory", [{}, {"lora_r": 4, "lora_save": "adapter"}], ids=["full", "lora"])
def test_killed_dpo_run_resumes_to_the_same_weights(policy_path: Path, tmp_path: Path, memory: dict) -> None:
    train, valid = keyword_rankings(16, seed=4), keyword_rankings(4, seed=5)
    config = DPOConfig(
        epochs=2, learning_rate=3e-3, rankings_per_step=4, rankings_per_micro_batch=2, checkpoint_every=2,
        loss="listwise", max_length=64, seed=1, device="cpu", **memory,
    )  # fmt: skip
    full = train_dpo(policy_path, train, valid, config, tmp_path / "full")

    def kill_at_step_5(step: int, total: int, metrics: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_dpo(policy_path, train, valid, config, tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt",
                  progress=kill_at_step_5)  # fmt: skip
    steps: list[int] = []
    resumed = train_dpo(policy_path, train, valid, config, tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt",
                        progress=lambda step, total, m: steps.append(step))  # fmt: skip
    assert steps == [5, 6, 7, 8]
    assert resumed == full
    weights = "adapter_model.safetensors" if memory else "model.safetensors"
    a, b = load_file(tmp_path / "full" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
