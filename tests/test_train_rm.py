"""Reward model on a tiny character-level model: the K-way loss, K forward rows per ranking, learning, save/load."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.tiny_lm import char_tokenizer, one_torch_thread, save_tiny_model
from worker.train_rm import (
    RankingExample,
    RewardModel,
    RMConfig,
    collate_rankings,
    kway_loss,
    listwise_loss,
    load_reward_model,
    score_completions,
    train_rm,
)

FILLER = ["blue", "fish", "tree", "lamp", "rain", "milk", "salt", "wave", "star", "leaf"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rm") / "base")


def keyword_rankings(n: int, seed: int, k_choices: tuple[int, ...] = (4,)) -> list[RankingExample]:
    """Completions containing 'good' beat those without (tied among themselves)."""
    rng = random.Random(seed)
    rankings = []
    for i in range(n):
        k = rng.choice(k_choices)
        n_good = rng.randint(1, k - 1)
        completions = []
        for j in range(k):
            # Same length either way, so only the keyword separates them.
            words = rng.sample(FILLER, 3)
            if j < n_good:
                words[rng.randint(0, 2)] = "good"
            completions.append(" ".join(words))
        ranks = [1] * n_good + [2] * (k - n_good)
        order = list(range(k))
        rng.shuffle(order)
        rankings.append(
            RankingExample(
                prompt=f"Say something {i % 7}",
                completions=[completions[o] for o in order],
                ranks=[ranks[o] for o in order],
                labeler=["ann", "bob"][i % 2],
            )
        )
    return rankings


def test_kway_loss_matches_hand_computed_pairs_with_ties() -> None:
    scores = torch.tensor([1.0, 0.0, 0.5, -1.0], requires_grad=True)
    ranks = [1, 2, 2, 3]  # completions 1 and 2 tie: 5 pairs, not 6
    loss = kway_loss(scores, ranks)
    # Pairs (0,1) (0,2) (0,3) (1,3) (2,3) with margins 1, 0.5, 2, 1, 1.5; -log σ(m) = log(1 + e^-m).
    expected = sum(math.log1p(math.exp(-m)) for m in [1.0, 0.5, 2.0, 1.0, 1.5]) / 5
    assert expected == pytest.approx(0.2857883, abs=1e-7)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    explicit = torch.stack(
        [-F.logsigmoid(scores[w] - scores[lo]) for w in range(4) for lo in range(4) if ranks[w] < ranks[lo]]
    ).mean()
    assert loss.item() == pytest.approx(explicit.item(), abs=1e-7)
    loss.backward()
    # Tied completions 1 and 2 only meet the others, never each other.
    assert scores.grad is not None and scores.grad[0] < 0 < scores.grad[3]

    with_l2 = kway_loss(torch.tensor([1.0, 0.0, 0.5, -1.0]), ranks, l2=0.1)
    assert with_l2.item() == pytest.approx(expected + 0.1 * (1 + 0 + 0.25 + 1) / 4, abs=1e-6)


def test_all_tie_ranking_contributes_nothing() -> None:
    scores = torch.tensor([0.3, -2.0, 1.0], requires_grad=True)
    loss = kway_loss(scores, [2, 2, 2])
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(scores.grad, torch.zeros(3))
    assert RankingExample("p", ["a", "b", "c"], [2, 2, 2]).n_pairs == 0
    assert RankingExample("p", ["a", "b", "c", "d"], [1, 2, 2, 3]).n_pairs == 5


def test_collate_puts_each_ranking_once_in_one_batch() -> None:
    tokenizer = char_tokenizer()
    rankings = keyword_rankings(3, seed=5, k_choices=(4, 6, 9))
    batch, spans = collate_rankings(tokenizer, rankings, max_length=128)
    ks = [len(r.completions) for r in rankings]
    assert batch["input_ids"].shape[0] == sum(ks)  # K rows per ranking, not 2·C(K, 2)
    assert [s.stop - s.start for s in spans] == ks and spans[0].start == 0 and spans[-1].stop == sum(ks)
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(sum(ks)), last] == tokenizer.eos_token_id).all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_forwards_exactly_k_rows_per_ranking(
    base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rankings = keyword_rankings(10, seed=1, k_choices=(4, 5, 6, 7, 8, 9))
    rows_per_call: list[int] = []
    forward = RewardModel.forward

    def recording_forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():
            rows_per_call.append(input_ids.shape[0])
        return forward(self, input_ids, attention_mask)

    monkeypatch.setattr(RewardModel, "forward", recording_forward)
    step_rows: list[int] = []
    config = RMConfig(epochs=2, learning_rate=1e-3, rankings_per_step=4, rankings_per_micro_batch=1, device="cpu")
    train_rm(
        base_model, rankings, [], config, tmp_path / "rm", progress=lambda step, total, m: step_rows.append(m["rows"])
    )
    ks = sorted(len(r.completions) for r in rankings)
    # One forward call per ranking per epoch, with exactly its K completions.
    assert len(rows_per_call) == 20
    assert sorted(rows_per_call[:10]) == ks and sorted(rows_per_call[10:]) == ks
    assert sum(step_rows) == 2 * sum(ks) and len(step_rows) == 2 * 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reward_model_learns_a_separable_preference(base_model: Path, tmp_path: Path) -> None:
    train, valid = keyword_rankings(64, seed=2), keyword_rankings(40, seed=3)
    train.append(RankingExample("Say something", ["blue fish", "tree lamp"], [1, 1], "ann"))  # all ties: skipped
    demonstrations = [(f"Say something {i}", f"{FILLER[i]} good") for i in range(7)]
    config = RMConfig(
        epochs=2,
        learning_rate=3e-3,
        rankings_per_step=8,
        rankings_per_micro_batch=4,
        warmup_ratio=0.1,
        seed=0,
        device="cpu",
    )
    metrics = train_rm(base_model, train, valid, config, tmp_path / "rm", demonstrations=demonstrations)
    assert metrics["n_train"] == 64 and metrics["n_train_all_ties"] == 1
    assert metrics["valid_accuracy"] > 0.9
    assert metrics["valid_accuracy"] > metrics["initial_valid_accuracy"] + 0.2
    assert set(metrics["labeler_agreement"]) == {"ann", "bob"}
    assert all(acc > 0.85 for acc in metrics["labeler_agreement"].values())
    assert metrics["valid_pairs"] == sum(r.n_pairs for r in valid) == sum(metrics["labeler_pairs"].values())
    assert metrics["normalised_on"] == "demonstrations"

    rm, tokenizer = load_reward_model(tmp_path / "rm")
    assert rm.reward_offset == pytest.approx(metrics["reward_offset"])
    demo_scores = score_completions(rm, tokenizer, [p for p, _ in demonstrations], [c for _, c in demonstrations])
    assert sum(demo_scores) / len(demo_scores) == pytest.approx(0.0, abs=1e-4)
    good, bad = score_completions(rm, tokenizer, ["Say something 3"] * 2, ["milk good star", "milk salt star"])
    assert good > bad


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_reward_model_learns_and_saves_an_adapter_on_its_base(base_model: Path, tmp_path: Path) -> None:
    train, valid = keyword_rankings(64, seed=2), keyword_rankings(40, seed=3)
    config = RMConfig(
        epochs=2,
        learning_rate=1e-2,
        rankings_per_step=8,
        rankings_per_micro_batch=4,
        warmup_ratio=0.1,
        seed=0,
        device="cpu",
        lora_r=8,
        lora_target_modules="all-linear",
        lora_save="adapter",
        gradient_checkpointing=True,
    )
    metrics = train_rm(base_model, train, valid, config, tmp_path / "rm")
    assert metrics["valid_accuracy"] > 0.9
    assert metrics["valid_accuracy"] > metrics["initial_valid_accuracy"] + 0.2
    # Saved as the adapter alone, with the base it needs; it loads merged and scores as it did in training.
    assert (tmp_path / "rm" / "backbone" / "adapter_config.json").exists()
    assert not (tmp_path / "rm" / "backbone" / "model.safetensors").exists()
    rm, tokenizer = load_reward_model(tmp_path / "rm")
    assert not any("lora_" in n for n, _ in rm.named_parameters())
    scores = [score_completions(rm, tokenizer, [r.prompt] * len(r.completions), r.completions) for r in valid]
    correct = sum(
        (a > b) + 0.5 * (a == b)
        for r, s in zip(valid, scores, strict=True)
        for i, a in enumerate(s)
        for j, b in enumerate(s)
        if r.ranks[i] < r.ranks[j]
    )
    assert correct / sum(r.n_pairs for r in valid) == pytest.approx(metrics["valid_accuracy"], abs=1e-6)


# --- the listwise (Plackett–Luce) loss ------------------------------------------------------------------------


def test_listwise_loss_of_two_outputs_is_the_pairwise_loss() -> None:
    scores = torch.tensor([0.3, 1.7])
    assert listwise_loss(scores, [2, 1]).item() == pytest.approx(-F.logsigmoid(torch.tensor(1.4)).item() / 2)
    # Per group: the pairwise loss is one term, the listwise one is that term over two groups (the last is 0).
    assert 2 * listwise_loss(scores, [2, 1]).item() == pytest.approx(kway_loss(scores, [2, 1]).item())


def test_listwise_loss_matches_efrons_formula_by_hand_with_a_tie() -> None:
    a, b, c, d = 2.0, 0.5, 0.1, -1.0  # ranks: a first, b and c tied second, d last
    scores = torch.tensor([c, a, d, b])
    ranks = [2, 1, 3, 2]
    e = math.exp
    first = a - math.log(e(a) + e(b) + e(c) + e(d))
    # The tie group {b, c} from {b, c, d}: Efron's two terms, the second with half the group's mass removed.
    tie = (b + c) - math.log(e(b) + e(c) + e(d)) - math.log(e(d) + 0.5 * (e(b) + e(c)))
    last = d - math.log(e(d))  # = 0
    expected = -(first + tie + last) / 3
    assert listwise_loss(scores, ranks).item() == pytest.approx(expected, rel=1e-6)
    # The order the outputs come in does not matter, only their ranks.
    order = [3, 0, 2, 1]
    assert listwise_loss(scores[order], [ranks[i] for i in order]).item() == pytest.approx(expected, rel=1e-6)
    assert listwise_loss(torch.tensor([1.0, 1.0, 1.0]), [1, 1, 1]).item() == 0.0  # all ties: nothing to learn


def test_listwise_loss_pulls_tied_outputs_together_and_orders_the_rest() -> None:
    scores = torch.tensor([0.0, 1.0, -0.5], requires_grad=True)  # outputs 0 and 1 tied best, 2 worst
    listwise_loss(scores, [1, 1, 2]).backward()
    grad = scores.grad
    assert grad[0] < 0 < grad[1]  # descent raises the lower tied score and lowers the higher one
    assert grad[2] > 0  # and lowers the worst


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_listwise_reward_model_learns_a_separable_preference(base_model: Path, tmp_path: Path) -> None:
    train, valid = keyword_rankings(64, seed=2), keyword_rankings(40, seed=3)
    config = RMConfig(
        epochs=2,
        learning_rate=3e-3,
        rankings_per_step=8,
        rankings_per_micro_batch=4,
        warmup_ratio=0.1,
        seed=0,
        device="cpu",
        loss="listwise",
    )
    metrics = train_rm(base_model, train, valid, config, tmp_path / "rm")
    assert metrics["valid_accuracy"] > 0.9
    assert metrics["valid_accuracy"] > metrics["initial_valid_accuracy"] + 0.2
    assert metrics["train_loss_curve"][-1] < metrics["train_loss_curve"][0]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("loss", ["pairwise", "listwise"])
def test_killed_reward_model_run_resumes_to_the_same_weights(base_model: Path, tmp_path: Path, loss: str) -> None:
    train, valid = keyword_rankings(16, seed=4), keyword_rankings(6, seed=5)
    config = RMConfig(
        epochs=2, learning_rate=3e-3, rankings_per_step=4, rankings_per_micro_batch=2, checkpoint_every=2,
        seed=1, device="cpu", loss=loss,
    )  # fmt: skip
    full = train_rm(base_model, train, valid, config, tmp_path / "full")

    def kill_at_step_5(step: int, total: int, metrics: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_rm(base_model, train, valid, config, tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt",
                 progress=kill_at_step_5)  # fmt: skip
    steps: list[int] = []
    resumed = train_rm(base_model, train, valid, config, tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt",
                       progress=lambda step, total, m: steps.append(step))  # fmt: skip
    assert steps == [5, 6, 7, 8]  # the step-4 checkpoint (an epoch end) survived; step 5 is redone
    assert resumed == full
    for part in ("head.safetensors", "backbone/model.safetensors"):
        a, b = load_file(tmp_path / "full" / part), load_file(tmp_path / "resumed" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
