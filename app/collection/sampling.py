"""The database side of sampling: which prompts still need outputs, storing them, and opening labeling.

The worker generates text; this module decides what to generate and records
it. Sampling is resumable: a prompt counts as done once it has K outputs
from the batch's policy, so a re-run after a crash only samples the rest.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session

from app.collection.batches import create_tasks, transition
from app.conversations import Message
from app.models import Completion, Prompt, PromptBatch, utcnow


def prompts_needing_samples(db: Session, batch: PromptBatch, model_version_id: int) -> list[tuple[int, list[Message]]]:
    """Returns (id, conversation) of the batch's prompts that have fewer than K outputs from this model."""
    have = (
        select(Completion.prompt_id, func.count().label("n"))
        .where(Completion.model_version_id == model_version_id)
        .group_by(Completion.prompt_id)
        .subquery()
    )
    rows = db.execute(
        select(Prompt.id, Prompt.messages)
        .outerjoin(have, have.c.prompt_id == Prompt.id)
        .where(Prompt.batch_id == batch.id, func.coalesce(have.c.n, 0) < batch.k)
        .order_by(Prompt.id)
    ).all()
    return [(row.id, row.messages) for row in rows]


def store_samples(db: Session, model_version_id: int, samples: dict[int, list[str]], sampling: dict) -> int:
    """Stores generated outputs for several prompts; replaces any partial set first. Returns rows stored."""
    if not samples:
        return 0
    db.execute(
        cast(Table, Completion.__table__)
        .delete()
        .where(Completion.prompt_id.in_(list(samples)), Completion.model_version_id == model_version_id)
    )
    # PostgreSQL text cannot hold NUL; an untrained model can emit it.
    rows = [
        {
            "prompt_id": pid,
            "text": text.replace("\x00", ""),
            "model_version_id": model_version_id,
            "sampling": sampling,
            "created_at": utcnow(),
        }
        for pid, texts in samples.items()
        for text in texts
    ]
    db.execute(insert(Completion), rows)
    return len(rows)


def open_for_labeling(db: Session, batch: PromptBatch) -> int:
    """Creates the batch's tasks and moves it to labeling; returns how many tasks were created."""
    created = create_tasks(db, batch)
    if batch.status == "sampling":
        transition(db, batch, "labeling")
    return created
