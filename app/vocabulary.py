"""The loop's vocabulary: the values each status, kind, role and flag column may take (CHECK constraints).

Kept apart from app/models.py (which imports and re-exports every name) so that the tables stay readable.
"""

from __future__ import annotations

MAX_ID = 2**63 - 1  # the largest id either database holds; requests naming a larger one are refused early

ROLES = ("labeler", "admin")
TOKEN_SCOPES = ("export:read", "label", "admin")
BATCH_STATUSES = ("draft", "sampling", "labeling", "paused", "completed", "archived")
# A collection batch gathers training data; an evaluation batch holds the prompts of one blind comparison.
BATCH_PURPOSES = ("collection", "evaluation")
PROMPT_CATEGORIES = ("plain", "few-shot", "user-based")
SPLITS = ("train", "valid", "test")
TASK_KINDS = ("demonstration", "ranking", "eval")
ASSIGNMENT_STATES = ("leased", "submitted", "skipped", "expired")
MODEL_KINDS = ("base", "sft", "rm", "policy")
MODEL_STATUSES = ("training", "validating", "ready", "failed", "promoted", "retired")
# A version in one of these may sample, be trained from or be promoted.
USABLE_STATUSES = ("ready", "promoted")
GOLD_SOURCES = ("ranking", "consensus")
EVALUATION_STATUSES = ("sampling", "labeling", "completed", "cancelled")
RUN_KINDS = ("pretrain", "sample", "sft", "rm", "ppo", "validate", "dpo")
# The trainers of the loop: one run of each kind at a time (the scheduler and admins cannot start a second).
TRAINING_KINDS = ("sft", "rm", "ppo", "dpo")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
RANKING_FLAGS = (
    "fails_instruction",
    "hallucination",
    "inappropriate_for_assistant",
    "sexual_content",
    "violent_content",
    "encourages_violence",
    "denigrates_protected_class",
    "harmful_advice",
    "moral_judgment",
    "personal_data",
)
