"""The database side of training: the data each trainer sees, and when the schedule retrains.

SFT reads demonstrations, the reward model reads rankings (each with all K
outputs and their ranks), PPO reads prompts. Train and validation come from
the prompts' split, which import assigned by source user, so no user's
prompts straddle them; rankings by held-out labelers go to validation only.
Beat calls `start_due_runs`, which starts SFT → RM → PPO as enough new data
or a newer upstream model arrives, one run per kind at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.conversations import PromptInput, prompt_input
from app.models import (
    TRAINING_KINDS,
    Completion,
    Demonstration,
    ModelVersion,
    Prompt,
    Ranking,
    RankingItem,
    TrainingRun,
    User,
    utcnow,
)
from app.runs import RunError, active_run, start_run


@dataclass
class RankingRow:
    """One ranking as the reward model trains on it."""

    prompt: PromptInput  # the text, or the conversation of a multi-turn prompt
    completions: list[str]
    ranks: list[int]
    labeler: str
    ranking_id: int


@dataclass
class Snapshot:
    """Which data a model was trained on: counts and id ranges, stored with the model version."""

    counts: dict[str, int] = field(default_factory=dict)
    max_ids: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "max_ids": self.max_ids}


def demonstrations(db: Session, max_id: int | None = None) -> tuple[dict[str, list[tuple[PromptInput, str]]], Snapshot]:
    """Returns (prompt, demonstration) pairs by split, up to a demonstration id; a prompt is its conversation."""
    query = (
        select(Demonstration.id, Prompt.text, Demonstration.text, Prompt.split, Prompt.messages)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .order_by(Demonstration.id)
    )
    if max_id is not None:
        query = query.where(Demonstration.id <= max_id)
    by_split: dict[str, list[tuple[PromptInput, str]]] = {"train": [], "valid": [], "test": []}
    last = 0
    for demo_id, prompt, text, split, messages in db.execute(query):
        by_split[split].append((prompt_input(messages, prompt), text))
        last = demo_id
    snap = Snapshot(counts={k: len(v) for k, v in by_split.items()}, max_ids={"demonstration": last})
    return by_split, snap


def rankings(db: Session, max_id: int | None = None) -> tuple[dict[str, list[RankingRow]], Snapshot]:
    """Returns rankings with their K outputs by split; held-out labelers' rankings go to validation."""
    query = (
        select(
            Ranking.id,
            Prompt.text,
            Prompt.split,
            User.id,
            User.held_out,
            Completion.text,
            RankingItem.rank,
            Prompt.messages,
        )
        .join(Prompt, Prompt.id == Ranking.prompt_id)
        .join(User, User.id == Ranking.labeler_id)
        .join(RankingItem, RankingItem.ranking_id == Ranking.id)
        .join(Completion, Completion.id == RankingItem.completion_id)
        # Gold checks are left out: every labeler answers the same few gold tasks, which would weigh them
        # once per labeler. The gold answers themselves are ordinary rankings and stay in.
        .where(Ranking.is_gold.is_(False))
        .order_by(Ranking.id, RankingItem.position)
    )
    if max_id is not None:
        query = query.where(Ranking.id <= max_id)
    rows: dict[int, tuple[str, RankingRow]] = {}
    for ranking_id, prompt, split, labeler_id, held_out, text, rank, messages in db.execute(query):
        if ranking_id not in rows:
            target = "valid" if held_out and split == "train" else split
            row = RankingRow(prompt_input(messages, prompt), [], [], f"labeler-{labeler_id}", ranking_id)
            rows[ranking_id] = (target, row)
        rows[ranking_id][1].completions.append(text)
        rows[ranking_id][1].ranks.append(rank)
    by_split: dict[str, list[RankingRow]] = {"train": [], "valid": [], "test": []}
    for split, row in rows.values():
        by_split[split].append(row)
    snap = Snapshot(counts={k: len(v) for k, v in by_split.items()}, max_ids={"ranking": max(rows, default=0)})
    return by_split, snap


def prompts_for_ppo(db: Session, split: str = "train", limit: int = 5000) -> list[PromptInput]:
    """Returns distinct prompts of a split for PPO rollouts or evaluation: texts, or multi-turn conversations."""
    rows = db.execute(select(Prompt.text, Prompt.messages).where(Prompt.split == split).order_by(Prompt.id))
    seen: set[str] = set()
    prompts: list[PromptInput] = []
    for text, messages in rows:
        prompt = prompt_input(messages, text)
        key = prompt if isinstance(prompt, str) else repr(prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
            if len(prompts) >= limit:
                break
    return prompts


def latest(db: Session, kind: str) -> ModelVersion | None:
    """Returns the newest usable (ready or promoted) version of a kind."""
    return db.scalar(
        select(ModelVersion)
        .where(ModelVersion.kind == kind, ModelVersion.status.in_(("ready", "promoted")))
        .order_by(ModelVersion.id.desc())
        .limit(1)
    )


def _trained_up_to(version: ModelVersion | None, key: str) -> int:
    if version is None:
        return 0
    return int(version.data_snapshot.get("max_ids", {}).get(key, 0))


def due_kinds(db: Session, min_demonstrations: int | None = None, min_rankings: int | None = None) -> list[str]:
    """Returns which of sft, rm, ppo should run now, in chain order (thresholds from the settings by default)."""
    settings = get_settings()
    min_demonstrations = settings.retrain_min_new_demonstrations if min_demonstrations is None else min_demonstrations
    min_rankings = settings.retrain_min_new_rankings if min_rankings is None else min_rankings
    due: list[str] = []
    sft, rm, policy = latest(db, "sft"), latest(db, "rm"), latest(db, "policy")
    # count() always yields one row; `or 0` only tells the type checker so
    new_demos = db.scalar(select(func.count()).where(Demonstration.id > _trained_up_to(sft, "demonstration"))) or 0
    if new_demos >= min_demonstrations:
        due.append("sft")
    if settings.retrain_policy_algorithm == "dpo":
        # SFT → DPO: the policy trains on the rankings directly, whenever enough are new or SFT changed.
        new_for_policy = db.scalar(select(func.count()).where(Ranking.id > _trained_up_to(policy, "ranking"))) or 0
        newer_start = sft is not None and policy is not None and policy.parent_id != sft.id
        if new_for_policy >= min_rankings or (newer_start and db.scalar(select(func.count()).select_from(Ranking))):
            due.append("dpo")
        return due
    new_rankings = db.scalar(select(func.count()).where(Ranking.id > _trained_up_to(rm, "ranking"))) or 0
    newer_backbone = sft is not None and rm is not None and rm.parent_id != sft.id
    if new_rankings >= min_rankings or (newer_backbone and db.scalar(select(func.count()).select_from(Ranking))):
        due.append("rm")
    if rm is not None and (sft is not None) and (policy is None or policy.lineage.get("rm") != rm.id):
        due.append("ppo")
    return due


def failed_recently(db: Session, kind: str) -> TrainingRun | None:
    """The kind's latest run, when the schedule started it and it failed within retrain_failure_backoff_s."""
    last = db.scalar(select(TrainingRun).where(TrainingRun.kind == kind).order_by(TrainingRun.id.desc()).limit(1))
    if last is None or last.status != "failed" or last.triggered_by != "schedule":
        return None
    since = utcnow() - timedelta(seconds=get_settings().retrain_failure_backoff_s)
    recent = db.scalar(select(TrainingRun.id).where(TrainingRun.id == last.id, TrainingRun.finished_at > since))
    return last if recent is not None else None


def start_due_runs(db: Session) -> list[TrainingRun]:
    """Starts the first due stage of the chain that is not already running (beat's retrain check).

    A stage whose scheduled run just failed waits (retrain_failure_backoff_s) instead of failing again at
    every check; later stages wait with it, since they need its model. An admin can start it at any time.
    """
    if any(active_run(db, kind) for kind in TRAINING_KINDS):
        return []  # one stage at a time: the next one waits for this one's model
    for kind in due_kinds(db):
        if failed_recently(db, kind) is not None:
            return []
        try:
            return [start_run(db, kind, triggered_by="schedule")]
        except RunError:
            return []
    return []


def missing_for(db: Session, kind: str) -> str | None:
    """Says what a run of `kind` still lacks to start (a model to start from, train data), or None when it can.

    The same queries the worker's jobs read, so a run that is refused here is one the job would fail.
    """
    base = latest(db, "base")  # a promoted base is usable too, so this finds one whenever the job would
    if kind == "sft":
        if base is None:
            return "SFT needs a base model to start from: register one first"
        count = len(demonstrations(db)[0]["train"])
        if count == 0:
            return f"SFT needs demonstrations in the train split: label some first ({count} so far)"
    elif kind in ("rm", "dpo"):
        name = "the reward model" if kind == "rm" else "DPO"
        if latest(db, "sft") is None and base is None:
            return f"{name} needs an SFT or base model to start from: register a base model first"
        train = rankings(db)[0]["train"]
        useful = sum(1 for row in train if len(set(row.ranks)) >= 2)
        if useful == 0:
            return (
                f"{name} needs rankings in the train split that put outputs in at least two different ranks: "
                f"rank some first ({useful} so far, of {len(train)} rankings)"
            )
    elif kind == "ppo":
        lacking = [name for name, k in (("an SFT model", "sft"), ("a reward model", "rm")) if latest(db, k) is None]
        if lacking:
            return f"PPO needs an SFT model and a reward model: train {' and '.join(lacking)} first"
    return None
