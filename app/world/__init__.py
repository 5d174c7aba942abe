"""The bundled world: instruction prompts with checkable answers, their true scorer,
a plain-text corpus for pretraining the tiny base model, and simulated labelers and
demonstrators that stand in for people when the loop runs unattended. Pure Python
(no torch), so the web side can generate prompts and score samples."""

from app.world.corpus import corpus
from app.world.labelers import (
    DEFAULT_NOISE,
    SimulatedDemonstrator,
    SimulatedLabeler,
    demonstrate,
    noise_for_agreement,
    pairwise_agreement,
)
from app.world.scorer import score, score_prompt
from app.world.tasks import FAMILIES, WorldPrompt, generate_prompts, parse_prompt

__all__ = [
    "DEFAULT_NOISE",
    "FAMILIES",
    "SimulatedDemonstrator",
    "SimulatedLabeler",
    "WorldPrompt",
    "corpus",
    "demonstrate",
    "generate_prompts",
    "noise_for_agreement",
    "pairwise_agreement",
    "parse_prompt",
    "score",
    "score_prompt",
]
