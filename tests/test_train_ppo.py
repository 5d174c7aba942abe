"""PPO on a tiny character-level model: EOS masking, GAE, a toy reward under a KL bound, RM plumbing, resumption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.training.configs import RMConfig
from tests.tiny_lm import char_tokenizer, one_torch_thread, save_tiny_model
from worker.adapters import prepare_for_training
from worker.modeling import load_model
from worker.ppo_models import build_ppo_models
from worker.train_ppo import (
    AdaptiveKLController,
    PPOConfig,
    gae,
    mask_after_stop,
    masked_whiten,
    sample,
    stop_token_ids,
    train_ppo,
)
from worker.train_rm import RewardModel, load_reward_model, score_completions

PROMPTS = [f"Write {w}" for w in ["one", "two", "three", "four", "five", "six", "seven", "eight"]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("ppo") / "sft")


def count_a(prompts: list[str], completions: list[str]) -> list[float]:
    """Toy reward: one point per 'a' in the completion."""
    return [float(c.count("a")) for c in completions]


def test_tokens_after_the_first_stop_are_masked() -> None:
    eos, newline, pad = 2, 8, 0
    responses = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9], [5, 8, 2, 9, 9]])
    masked, keep, ended = mask_after_stop(responses, torch.tensor([eos, newline]), pad)
    assert keep.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert masked.tolist() == [[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0], [5, 8, 0, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


def test_stop_tokens_follow_the_samplers_newline_rule() -> None:
    tokenizer = char_tokenizer()
    eos, newline = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")
    assert stop_token_ids(tokenizer, None).tolist() == sorted([eos, newline])  # no chat template: one-line answers
    assert stop_token_ids(tokenizer, False).tolist() == [eos]


def test_gae_matches_hand_computation() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after two tokens
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # With γ = λ = 1 the return is the sum of later rewards; what lies past the mask is ignored.
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [2.5, 2.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.9], [2.2, 1.6, 0.0]]))
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # Row 1: δ = (0 + .5·.2 − .5, 0 + .5·.1 − .2, 1 − .1) = (−.4, −.15, .9); A_t = δ_t + .25·A_{t+1}.
    assert advantages[0].tolist() == pytest.approx([-0.4 + 0.25 * (-0.15 + 0.25 * 0.9), -0.15 + 0.25 * 0.9, 0.9])
    whitened = masked_whiten(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]]), mask)
    assert whitened[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened[1, 2].item() == 0.0


def test_adaptive_kl_controller_moves_towards_the_target() -> None:
    control = AdaptiveKLController(0.1, target=6.0, horizon=100)
    control.update(12.0, n_rollouts=10)  # far above target: error clipped to +0.2
    assert control.value == pytest.approx(0.1 * 1.02)
    control.update(3.0, n_rollouts=10)  # below target: error clipped to -0.2
    assert control.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_sampled_rollouts_mask_and_decode_consistently(policy_path: Path) -> None:
    policy, tokenizer = load_model(policy_path, device="cpu")
    eos, newline = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")
    torch.manual_seed(0)
    rollout = sample(policy, tokenizer, PROMPTS * 8, PPOConfig(max_new_tokens=16, device="cpu"))
    response = rollout.sequences[:, rollout.prompt_length :]
    mask = rollout.response_mask.bool()
    last_tokens = {response[row][mask[row]][-1].item() for row in range(len(PROMPTS) * 8) if rollout.ended[row]}
    assert last_tokens == {eos, newline} and not rollout.ended.all()  # every case occurs with this seed
    for row in range(len(PROMPTS) * 8):
        kept = response[row][mask[row]].tolist()
        if rollout.ended[row]:
            assert kept[-1] in (eos, newline) and not {eos, newline} & set(kept[:-1])
        else:
            assert len(kept) == response.shape[1] and not {eos, newline} & set(kept)
        assert rollout.texts[row] == tokenizer.decode(kept, skip_special_tokens=True).strip()
        assert "\n" not in rollout.texts[row]
        assert (response[row][~mask[row]] == tokenizer.pad_token_id).all()
    # Prompts are left-padded, so every prompt ends where its completion starts.
    assert (rollout.mask[:, rollout.prompt_length - 1] == 1).all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ppo_raises_a_toy_reward_within_a_kl_bound(policy_path: Path, tmp_path: Path) -> None:
    beta = 0.25
    config = PPOConfig(
        steps=20,
        rollout_batch_size=16,
        minibatch_size=4,
        micro_batch_size=4,
        ppo_epochs=4,
        learning_rate=1e-2,
        value_learning_rate=1e-2,
        kl_coef=beta,
        max_new_tokens=8,
        eval_batch_size=32,
        device="cpu",
    )
    logged: list[dict] = []
    result = train_ppo(
        policy_path,
        count_a,
        PROMPTS,
        config,
        tmp_path / "policy",
        eval_prompts=PROMPTS * 4,
        progress=lambda step, total, m: logged.append(m),
    )
    before, after = result["eval_initial"], result["eval"]
    assert len(logged) == 20 and {"reward", "kl", "clipfrac", "value_loss", "entropy"} <= set(logged[0])
    assert before["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert after["reward"] > before["reward"] + 1.5
    # Without the KL term the policy collapses to all 'a' within these steps (~30 nats over 8
    # tokens, as it does with β = 0.02); with β = 0.25 the KL-regularised optimum sits near 9 nats
    # (p('a') = e⁴/(75 + e⁴) per token), and seeds 0-3 end between 8 and 16.
    assert after["kl"] < 20.0
    # The objective PPO maximises, reward − β·KL, improved.
    assert after["reward"] - beta * after["kl"] > before["reward"] + 0.3
    policy, _ = load_model(tmp_path / "policy", device="cpu")
    assert sum(p.numel() for p in policy.parameters()) > 0


def test_learning_rate_stays_at_its_peak_under_the_constant_schedule_and_decays_under_cosine(
    policy_path: Path, tmp_path: Path
) -> None:
    lrs: dict[str, list[float]] = {}
    for schedule in ("constant", "cosine"):
        config = PPOConfig(
            steps=3,
            rollout_batch_size=4,
            minibatch_size=4,
            micro_batch_size=4,
            ppo_epochs=1,
            learning_rate=1e-3,
            max_new_tokens=4,
            lr_schedule=schedule,
            device="cpu",
        )
        logged: list[dict] = []
        train_ppo(
            policy_path,
            count_a,
            PROMPTS,
            config,
            tmp_path / schedule,
            eval_prompts=PROMPTS[:1],
            progress=lambda step, total, m, logged=logged: logged.append(m),
        )
        lrs[schedule] = [m["lr"] for m in logged]
    # PPO's rollouts are new at every step: the last step must still learn.
    assert lrs["constant"] == pytest.approx([1e-3] * 3)
    assert lrs["cosine"][0] < 1e-3 and lrs["cosine"][-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_ppo(policy_path, count_a, PROMPTS, PPOConfig(lr_schedule="linear", device="cpu"), tmp_path / "x")


def test_missing_eos_penalty_is_applied(policy_path: Path, tmp_path: Path) -> None:
    config = PPOConfig(
        steps=1,
        rollout_batch_size=16,
        minibatch_size=8,
        micro_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=12,
        missing_eos_penalty=1.0,
        device="cpu",
    )
    logged: list[dict] = []
    train_ppo(
        policy_path,
        lambda p, c: [0.0] * len(c),
        PROMPTS,
        config,
        tmp_path / "policy",
        eval_prompts=PROMPTS[:1],
        progress=lambda step, total, m: logged.append(m),
    )
    assert 0 < logged[0]["ended_fraction"] < 1
    assert logged[0]["reward"] == pytest.approx(-(1 - logged[0]["ended_fraction"]))


def save_reward_model(policy_path: Path, out: Path, *, adapter: bool) -> Path:
    """A reward model on the policy's body with a moved head and offset; with adapter, a LoRA adapter saved alone."""
    lm, tokenizer = load_model(policy_path, device="cpu")
    torch.manual_seed(1)
    rm = RewardModel.from_causal_lm(lm, max_length=64)
    rm.reward_offset = 0.7
    if adapter:
        rm.backbone = prepare_for_training(rm.backbone, RMConfig(lora_r=4, lora_dropout=0.0), task_type=None)
        for name, param in rm.backbone.named_parameters():
            if "lora_B" in name:  # B starts at zero: move it so the adapter changes the scores
                torch.nn.init.normal_(param, std=0.3)
    rm.save(out, tokenizer, adapter_base=str(policy_path) if adapter else None)
    return out


MEMORY_MODES = {
    # name: (PPO settings, reward model saved as an adapter on the policy's base, frozen bases)
    "full": ({}, False, 2),
    "lora-separate-rm": ({"lora_r": 4, "gradient_checkpointing": True}, False, 2),
    "lora-one-base": ({"lora_r": 4}, True, 1),
}


@pytest.mark.parametrize("mode", sorted(MEMORY_MODES))
def test_value_network_starts_from_the_reward_model_and_reference_from_the_policy(
    policy_path: Path, tmp_path: Path, mode: str
) -> None:
    settings, adapter, frozen_bases = MEMORY_MODES[mode]
    rm_path = save_reward_model(policy_path, tmp_path / "rm", adapter=adapter)
    rm, tokenizer = load_reward_model(rm_path)
    assert (rm_path / "backbone" / "adapter_config.json").exists() is adapter
    config = PPOConfig(
        steps=1,
        rollout_batch_size=4,
        minibatch_size=4,
        micro_batch_size=2,
        ppo_epochs=1,
        max_new_tokens=6,
        device="cpu",
        **settings,
    )
    models = build_ppo_models(policy_path, rm_path, config, "cpu")
    assert models.frozen_bases == frozen_bases
    prompts, completions = ["Write one", "Write two"], ["abc", "a"]
    rewards = score_completions(rm, tokenizer, prompts, completions)
    assert any(abs(r - 0.0) > 1e-3 for r in rewards)
    # The scorer is the saved reward model, shared base or not; the value network starts as it (offset folded in).
    assert models.scorer(prompts, completions) == pytest.approx(rewards, abs=1e-5)
    models.value.train()
    with models.value_scope():
        values = score_completions(models.value, tokenizer, prompts, completions)
    assert values == pytest.approx(rewards, abs=1e-5)
    # The reference is the SFT policy: with LoRA, the same base with the (zero-initialised) adapter off.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(models.reference(input_ids=ids).logits, models.policy(input_ids=ids).logits)
    trained = sum(p.numel() for _, p in models.policy_params)
    total = sum(p.numel() for p in models.policy.parameters())
    assert (trained == total) is (mode == "full")

    result = train_ppo(policy_path, rm_path, PROMPTS, config, tmp_path / "policy", eval_prompts=PROMPTS[:4])
    assert result["steps"] == 1 and result["n_eval_prompts"] == 4
    assert result["frozen_bases"] == frozen_bases
    numbers = [result["eval"]["reward"], result["eval"]["kl"], *result["log"][0].values()]
    assert torch.isfinite(torch.tensor(numbers)).all()
    assert result["log"][0]["value_loss"] > 0 and result["log"][0]["policy_loss"] != 0
    # Merged or full, the saved policy is a plain model that changed in training.
    saved, _ = load_model(tmp_path / "policy", device="cpu")
    base, _ = load_model(policy_path, device="cpu")
    assert not any("lora_" in n for n, _ in saved.named_parameters())
    changed = [n for n, p in saved.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and (mode == "full" or all("q_proj" in n or "v_proj" in n for n in changed)), changed


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("memory", [{}, {"lora_r": 4, "lora_save": "adapter"}], ids=["full", "lora"])
def test_killed_run_resumes_to_the_same_policy(policy_path: Path, tmp_path: Path, memory: dict) -> None:
    config = PPOConfig(
        **memory,
        steps=4,
        rollout_batch_size=6,
        minibatch_size=4,
        micro_batch_size=2,
        ppo_epochs=2,
        learning_rate=3e-3,
        value_learning_rate=3e-3,
        max_new_tokens=6,
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=20,
        ptx_coef=0.5,
        ptx_batch_size=2,
        checkpoint_every=2,
        seed=5,
        device="cpu",
    )
    ptx = [("Write one", "a a"), ("", "plain text about the world")]
    kwargs = {"ptx_examples": ptx, "eval_prompts": PROMPTS[:4]}
    full = train_ppo(policy_path, count_a, PROMPTS, config, tmp_path / "full", **kwargs)

    def kill_at_step_3(step: int, total: int, metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_ppo(
            policy_path,
            count_a,
            PROMPTS,
            config,
            tmp_path / "resumed",
            checkpoint_dir=tmp_path / "ckpt",
            progress=kill_at_step_3,
            **kwargs,
        )
    steps: list[int] = []
    resumed = train_ppo(
        policy_path,
        count_a,
        PROMPTS,
        config,
        tmp_path / "resumed",
        checkpoint_dir=tmp_path / "ckpt",
        progress=lambda step, total, m: steps.append(step),
        **kwargs,
    )
    assert steps == [3, 4]  # the step-2 checkpoint survived; step 3 is redone
    assert "ptx_loss" in full["log"][0] and full["kl_coef"] != config.kl_coef
    assert resumed == full
    weights = "adapter_model.safetensors" if memory else "model.safetensors"  # LoRA: saved as the adapter alone
    a, b = load_file(tmp_path / "full" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
