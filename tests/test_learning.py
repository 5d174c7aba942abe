"""The loop improves true quality: SFT beats the base model, PPO keeps it, judged by the world's true scorer.

One small, seeded loop on the bundled world (worker/experiment.py, the loop bench/learning.py measures at full
size): simulated demonstrations → SFT of models/world-base → K = 4..6 samples ranked by simulated labelers →
reward model → PPO against it → greedy answers of base, SFT and PPO to 100 held-out test prompts, scored by
app.world.score. The trainers are the worker's own (worker/train_*.py) with the shipped recipe
(models/world-base/training_recipe.json); only the sizes are smaller (experiment.SMALL: 400 demonstrations,
500 rankings, 16 PPO steps of 32 rollouts), about two CPU minutes on one thread.

Why the margins are safe: bench/RESULTS.md ("learning test") has these sizes run for seeds 1-4 (not the
seed used here), `bench/learning.py --small --seeds 2 --first-seed 1` and `--first-seed 3`. The figures and
the distance of the worst seed from each margin are beside the constants below. This seed's loop gave SFT − base
+0.164, RM gain +0.513, KL 1.26, PPO − SFT +0.179, and the bench's run of seed 0 gave the same figures to the
last digit (one torch thread on CPU is deterministic).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

SEED = 0  # chosen before the sweep; the margins below come from seeds 1-4 only

# SFT − base, greedy true score: seeds 1-4 +0.157 .. +0.279 (mean +0.234); the worst clears 0.08 by 0.077.
SFT_OVER_BASE = 0.08
# RM mean score on the test prompts, PPO − SFT: seeds 1-4 +0.369 .. +0.513 (mean +0.433); the worst clears 0.15
# by 0.22. PPO optimises this score, so the check is that it does, on prompts it never trained on.
RM_GAIN = 0.15
# KL(PPO ‖ SFT) on the test prompts: seeds 1-4 0.79 .. 1.20 nats per completion; 2.5 is twice the worst. Both
# deliberate breaks tried while writing this test overshot it (3.2 and 2.9 nats).
KL_BOUND = 2.5
# PPO − SFT, greedy true score: seeds 1-4 +0.017 .. +0.140 (mean +0.064): PPO was never worse, so "at most 0.05
# worse" is 0.067 below the worst seed. A gain is not asserted: the worst seed's +0.017 is within test noise.
PPO_MAX_LOSS = 0.05


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from transformers.utils import logging as hf_logging

    from worker.experiment import SMALL, run_loop

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # One thread: results must not depend on the core count, and CPU kernels are deterministic with one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        # No T = 1 view: the assertions need greedy scores and the RM's own evaluation only.
        yield run_loop(SEED, SMALL, tmp_path_factory.mktemp("learning"), sampled_view=False, log=print)
    finally:
        torch.set_num_threads(threads)


def test_sft_beats_the_base_model_on_the_true_score(loop: dict) -> None:
    gain = loop["sft_true"] - loop["base_true"]
    assert gain > SFT_OVER_BASE, f"SFT {loop['sft_true']:.3f} vs base {loop['base_true']:.3f}: gain {gain:+.3f}"


def test_ppo_raises_the_reward_models_score_on_held_out_prompts_within_a_kl_bound(loop: dict) -> None:
    before, after = loop["ppo_rm_reward_before"], loop["ppo_rm_reward_after"]
    assert after - before > RM_GAIN, f"RM score on test prompts: SFT {before:+.3f}, PPO {after:+.3f}"
    assert loop["ppo_kl"] < KL_BOUND, f"KL(PPO ‖ SFT) ran away: {loop['ppo_kl']:.3f} nats"


def test_ppo_is_not_worse_than_sft_on_the_true_score(loop: dict) -> None:
    loss = loop["sft_true"] - loop["ppo_true"]
    assert loss < PPO_MAX_LOSS, f"PPO {loop['ppo_true']:.3f} vs SFT {loop['sft_true']:.3f}"
