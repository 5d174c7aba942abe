"""Blind human evaluation of model versions: two models answer held-out prompts, labelers pick the better.

An admin (or the worker, after each PPO run) starts an evaluation of model A
(the candidate) against model B (the baseline) on a sample of held-out
prompts. The prompts are copied into a batch of their own (`purpose =
'evaluation'`, so collection pages, exports and training never see it); the
worker samples one output per model per prompt (`worker.jobs.run_sampling`)
and each prompt becomes an `eval` task holding the two outputs, shown to every
labeler in a random order of their own, with nothing that names a model. A
labeler picks the better output or a tie. When the last task closes the
evaluation completes; its result is A's win rate with a Wilson interval (ties
count half), the tie rate, and the same per prompt category and per world
family. Promotion of a policy can require a won evaluation against the
promoted one (`Settings.promotion_requires_eval_win`). Services never commit.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.orm import Session

from app import events
from app.collection.batches import complete_if_done, transition
from app.config import get_settings
from app.db import get_existing
from app.errors import FieldError
from app.models import (
    Completion,
    EvalJudgment,
    Evaluation,
    ModelVersion,
    Prompt,
    PromptBatch,
    Task,
    TaskItem,
    TrainingRun,
    promoted_version,
    utcnow,
)
from app.quality.stats import win_rate
from app.runs import start_run

log = logging.getLogger(__name__)

GENERATIVE_KINDS = ("base", "sft", "policy")
MAX_PROMPTS = 2000
EVAL_PRIORITY = 10  # comparisons come before collection work when a labeler asks for any task
EVAL_GUIDELINES = """Two responses to the same prompt are shown side by side, in a random order.

- Pick the one that answers the prompt better: **correct** first, then **follows the instruction**
  (format, length), then concise and helpful.
- Choose **Tie** only when neither is better.
- You do not know which model wrote which response, and should not try to guess.
"""


class EvaluationError(FieldError):
    """A user-caused problem with an evaluation; `field` names what is wrong, `status` the HTTP code."""


# --- starting ------------------------------------------------------------------------------------


def _usable_generator(db: Session, version_id: int, field_name: str) -> ModelVersion:
    version = db.get(ModelVersion, version_id)
    if version is None:
        raise EvaluationError(field_name, f"no model version {version_id}", status=404)
    if version.kind not in GENERATIVE_KINDS:
        raise EvaluationError(
            field_name, f"{version.name} is a {version.kind} model; compare base, SFT or policy models"
        )
    if version.status not in ("ready", "promoted"):
        raise EvaluationError(field_name, f"{version.name} is {version.status}; only ready or promoted models answer")
    return version


def _held_out_prompts(db: Session, split: str, n: int, seed: int, source_batch_id: int | None) -> list[Prompt]:
    """Draws up to n distinct held-out prompts (one per normalised text) from collection batches."""
    first_of_text = (
        select(func.min(Prompt.id))
        .join(PromptBatch, PromptBatch.id == Prompt.batch_id)
        .where(Prompt.split == split, PromptBatch.purpose == "collection")
        .group_by(Prompt.normalized_key)
    )
    if source_batch_id is not None:
        first_of_text = first_of_text.where(Prompt.batch_id == source_batch_id)
    ids = sorted(db.scalars(first_of_text.limit(50_000)))
    chosen = random.Random(seed).sample(ids, min(n, len(ids)))
    return list(db.scalars(select(Prompt).where(Prompt.id.in_(chosen)).order_by(Prompt.id))) if chosen else []


def start_evaluation(
    db: Session,
    *,
    model_a_id: int,
    model_b_id: int,
    n_prompts: int = 50,
    overlap: int = 1,
    prompt_split: str = "test",
    temperature: float = 0.0,
    max_new_tokens: int = 48,
    source_batch_id: int | None = None,
    triggered_by: str = "admin",
    created_by_id: int | None = None,
) -> Evaluation:
    """Creates an evaluation of A against B on held-out prompts and queues the sampling of both models."""
    if model_a_id == model_b_id:
        raise EvaluationError("model_b_id", "choose two different model versions")
    a = _usable_generator(db, model_a_id, "model_a_id")
    b = _usable_generator(db, model_b_id, "model_b_id")
    if not 1 <= n_prompts <= MAX_PROMPTS:
        raise EvaluationError("n_prompts", f"must be between 1 and {MAX_PROMPTS}")
    if not 1 <= overlap <= 20:
        raise EvaluationError("overlap", "must be between 1 and 20")
    if prompt_split not in ("test", "valid"):
        raise EvaluationError("prompt_split", "must be test or valid: evaluation prompts are held out from training")
    if not 0 <= temperature <= 10:
        raise EvaluationError("temperature", "must be between 0 (greedy) and 10")
    if not 1 <= max_new_tokens <= 4096:
        raise EvaluationError("max_new_tokens", "must be between 1 and 4096")
    if source_batch_id is not None and db.get(PromptBatch, source_batch_id) is None:
        raise EvaluationError("source_batch_id", f"no batch {source_batch_id}", status=404)
    seed = random.SystemRandom().randrange(2**31)
    prompts = _held_out_prompts(db, prompt_split, n_prompts, seed, source_batch_id)
    if not prompts:
        raise EvaluationError(
            "prompt_split",
            f"no {prompt_split}-split prompts to evaluate on yet; import prompts "
            "(the import assigns splits by source user)",
            status=409,
        )
    batch = PromptBatch(
        name=f"evaluation-{uuid.uuid4().hex[:12]}",
        purpose="evaluation",
        guidelines=EVAL_GUIDELINES,
        status="sampling",
        wants_demonstrations=False,
        wants_rankings=True,
        overlap=overlap,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        priority=EVAL_PRIORITY,
        created_by_id=created_by_id,
    )
    db.add(batch)
    db.flush()
    db.execute(
        insert(Prompt),
        [
            {
                "batch_id": batch.id,
                "text": p.text,
                "messages": p.messages,
                "source_user_id": p.source_user_id,
                "category": p.category,
                "split": p.split,
                "normalized_key": p.normalized_key,
                "prefix_key": p.prefix_key,
                "extra": p.extra or {},
                "pii_flags": p.pii_flags or [],
                "created_at": utcnow(),
            }
            for p in prompts
        ],
    )
    evaluation = Evaluation(
        model_a_id=a.id,
        model_b_id=b.id,
        batch_id=batch.id,
        status="sampling",
        n_prompts=len(prompts),
        overlap=overlap,
        prompt_split=prompt_split,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        triggered_by=triggered_by,
        created_by_id=created_by_id,
    )
    db.add(evaluation)
    db.flush()
    # A neutral name: labelers never see it, but it must not name the models if they ever did.
    batch.name = f"Evaluation {evaluation.id}"
    start_run(db, "sample", batch_id=batch.id, triggered_by="evaluation", params={"evaluation_id": evaluation.id})
    return evaluation


def for_batch(db: Session, batch_id: int) -> Evaluation | None:
    """Returns the evaluation an evaluation batch belongs to."""
    return db.scalar(select(Evaluation).where(Evaluation.batch_id == batch_id))


# --- sampling (called by the worker) -------------------------------------------------------------


def prompts_needing_output(
    db: Session, evaluation: Evaluation, model_version_id: int
) -> list[tuple[int, list[dict[str, str]]]]:
    """Returns (id, conversation) of the evaluation's prompts that have no output from this model yet."""
    have = select(Completion.prompt_id).where(Completion.model_version_id == model_version_id)
    return [
        (pid, messages)
        for pid, messages in db.execute(
            select(Prompt.id, Prompt.messages)
            .where(Prompt.batch_id == evaluation.batch_id, Prompt.id.not_in(have))
            .order_by(Prompt.id)
        )
    ]


def open_for_judging(db: Session, evaluation: Evaluation) -> int:
    """Creates one eval task per prompt whose two outputs differ and opens the batch; returns tasks created."""
    # evaluations.batch_id is a non-null foreign key to prompt_batches
    batch = get_existing(db, PromptBatch, evaluation.batch_id, with_for_update=True)
    outputs: dict[int, dict[int, Completion]] = defaultdict(dict)
    for completion in db.scalars(
        select(Completion)
        .join(Prompt, Prompt.id == Completion.prompt_id)
        .where(
            Prompt.batch_id == batch.id, Completion.model_version_id.in_((evaluation.model_a_id, evaluation.model_b_id))
        )
        .order_by(Completion.id)
    ):
        if completion.model_version_id is None:  # never: the query selects only the two models' outputs
            continue
        outputs[completion.prompt_id].setdefault(completion.model_version_id, completion)
    existing = set(db.scalars(select(Task.prompt_id).where(Task.batch_id == batch.id)))
    created = identical = 0
    for prompt_id, by_model in sorted(outputs.items()):
        a, b = by_model.get(evaluation.model_a_id), by_model.get(evaluation.model_b_id)
        if a is None or b is None or prompt_id in existing:
            continue
        if a.text.strip() == b.text.strip():
            identical += 1  # nothing to judge: the two models agree word for word
            continue
        task = Task(
            batch_id=batch.id, prompt_id=prompt_id, kind="eval", needed=evaluation.overlap, priority=batch.priority
        )
        db.add(task)
        db.flush()
        db.execute(
            insert(TaskItem),
            [
                {"task_id": task.id, "completion_id": a.id, "position": 0},
                {"task_id": task.id, "completion_id": b.id, "position": 1},
            ],
        )
        created += 1
    evaluation.n_identical += identical
    if batch.status == "sampling":
        transition(db, batch, "labeling")
    if evaluation.status == "sampling":
        evaluation.status = "labeling"
    complete_if_done(db, batch.id)  # every pair identical: nothing to judge, done at once
    return created


# --- judging -------------------------------------------------------------------------------------


@events.on("batch.completed")
def on_batch_completed(db: Session, event: str, payload: dict[str, Any]) -> None:
    """Completes the evaluation of a finished evaluation batch; the registry may then promote its winner."""
    evaluation = for_batch(db, payload["batch_id"])
    if evaluation is None or evaluation.status in ("completed", "cancelled"):
        return
    evaluation.status = "completed"
    evaluation.completed_at = utcnow()
    db.flush()
    events.emit(db, "evaluation.completed", {"evaluation_id": evaluation.id})


def cancel_evaluation(db: Session, evaluation: Evaluation) -> Evaluation:
    """Cancels an evaluation that has not completed: its tasks close, its sampling run is cancelled."""
    if evaluation.status in ("completed", "cancelled"):
        raise EvaluationError("status", f"evaluation {evaluation.id} is already {evaluation.status}", status=409)
    evaluation.status = "cancelled"
    evaluation.completed_at = utcnow()
    db.execute(cast(Table, Task.__table__).update().where(Task.batch_id == evaluation.batch_id).values(is_open=False))
    batch = get_existing(db, PromptBatch, evaluation.batch_id)  # a non-null foreign key
    batch.status = "archived"  # out of every queue; kept, with its verdicts so far, for the record
    # Its sampling run, if still going, stops at its next heartbeat.
    db.execute(
        update(TrainingRun)
        .where(TrainingRun.batch_id == batch.id, TrainingRun.status.in_(("queued", "running")))
        .values(status="cancelled", finished_at=utcnow(), message="evaluation cancelled")
    )
    db.flush()
    return evaluation


# --- results -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Verdicts on one slice of an evaluation, from A's side."""

    wins: int = 0  # A preferred
    losses: int = 0  # B preferred
    ties: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    def summary(self) -> dict[str, Any]:
        """A's win rate (ties count half) with its 95 % Wilson interval, and the tie rate."""
        found = win_rate(self.wins, self.losses, self.ties)
        return {
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "n": self.n,
            "win_rate": found.rate,
            "low": found.low if self.n else None,
            "high": found.high if self.n else None,
            "tie_rate": found.tie_rate,
        }


@dataclass
class EvaluationResult:
    """Everything the pages and the API show about one evaluation."""

    evaluation_id: int
    status: str
    model_a: dict[str, Any]
    model_b: dict[str, Any]
    n_prompts: int
    n_identical: int
    tasks: int
    tasks_done: int
    overall: dict[str, Any]
    by_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_shown_wins: float | None = None  # share of decisive verdicts won by the output shown first
    labelers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ref(version: ModelVersion | None, version_id: int) -> dict[str, Any]:
    if version is None:
        return {"id": version_id, "name": None, "kind": None}
    return {"id": version.id, "name": version.name, "kind": version.kind}


def results(db: Session, evaluation: Evaluation) -> EvaluationResult:
    """Tallies an evaluation's verdicts: overall, per prompt category and per world family."""
    rows = db.execute(
        select(EvalJudgment.winner, EvalJudgment.shown_first, EvalJudgment.labeler_id, Prompt.category, Prompt.extra)
        .join(Prompt, Prompt.id == EvalJudgment.prompt_id)
        .where(EvalJudgment.evaluation_id == evaluation.id)
    ).all()
    overall = Tally()
    by_category: defaultdict[str, Tally] = defaultdict(Tally)
    by_family: defaultdict[str, Tally] = defaultdict(Tally)
    first_wins = decisive = 0
    for winner, shown_first, _labeler, category, extra in rows:
        slices = [overall, by_category[category]]
        family = (extra or {}).get("family")
        if isinstance(family, str):
            slices.append(by_family[family])
        for tally in slices:
            if winner == "a":
                tally.wins += 1
            elif winner == "b":
                tally.losses += 1
            else:
                tally.ties += 1
        if winner != "tie":
            decisive += 1
            first_wins += winner == shown_first
    tasks, done = db.execute(
        select(func.count(), func.coalesce(func.sum(Task.done_count), 0)).where(Task.batch_id == evaluation.batch_id)
    ).one()
    versions = {
        v.id: v
        for v in db.scalars(
            select(ModelVersion).where(ModelVersion.id.in_((evaluation.model_a_id, evaluation.model_b_id)))
        )
    }
    return EvaluationResult(
        evaluation_id=evaluation.id,
        status=evaluation.status,
        model_a=_ref(versions.get(evaluation.model_a_id), evaluation.model_a_id),
        model_b=_ref(versions.get(evaluation.model_b_id), evaluation.model_b_id),
        n_prompts=evaluation.n_prompts,
        n_identical=evaluation.n_identical,
        tasks=int(tasks),
        tasks_done=int(done),
        overall=overall.summary(),
        by_category={k: v.summary() for k, v in sorted(by_category.items())},
        by_family={k: v.summary() for k, v in sorted(by_family.items())},
        first_shown_wins=first_wins / decisive if decisive else None,
        labelers=len({labeler for _w, _s, labeler, _c, _e in rows}),
    )


def for_model(db: Session, version_id: int) -> list[dict[str, Any]]:
    """Lists the evaluations a version took part in, each with the result from that version's side."""
    found = db.scalars(
        select(Evaluation)
        .where((Evaluation.model_a_id == version_id) | (Evaluation.model_b_id == version_id))
        .order_by(Evaluation.id.desc())
    ).all()
    out = []
    for evaluation in found:
        result = results(db, evaluation)
        mine = result.overall
        if evaluation.model_b_id == version_id:  # seen from B's side, A's wins are losses
            mine = Tally(mine["losses"], mine["wins"], mine["ties"]).summary()
        opponent = result.model_b if evaluation.model_a_id == version_id else result.model_a
        out.append(
            {
                "evaluation_id": evaluation.id,
                "status": evaluation.status,
                "opponent": opponent,
                "side": "a" if evaluation.model_a_id == version_id else "b",
                "result": mine,
                "created_at": evaluation.created_at,
            }
        )
    return out


def has_won(db: Session, candidate_id: int, baseline_id: int) -> bool:
    """Says whether the latest completed evaluation between two versions went to the candidate (rate > 50 %)."""
    latest = db.scalar(
        select(Evaluation)
        .where(
            Evaluation.status == "completed",
            ((Evaluation.model_a_id == candidate_id) & (Evaluation.model_b_id == baseline_id))
            | ((Evaluation.model_a_id == baseline_id) & (Evaluation.model_b_id == candidate_id)),
        )
        .order_by(Evaluation.completed_at.desc(), Evaluation.id.desc())
        .limit(1)
    )
    if latest is None:
        return False
    rate = results(db, latest).overall["win_rate"]
    if rate is None:
        return False
    return rate > 0.5 if latest.model_a_id == candidate_id else rate < 0.5


# --- the loop: evaluate after PPO, promote on a win ----------------------------------------------


def baseline_for(db: Session, candidate: ModelVersion) -> ModelVersion | None:
    """Returns what a new policy should be compared with: the promoted policy, else the SFT it came from."""
    current = promoted_version(db, "policy")
    if current is not None and current.id != candidate.id:
        return current
    sft_id = (candidate.lineage or {}).get("sft") or candidate.parent_id
    sft = db.get(ModelVersion, sft_id) if sft_id else None
    return sft if sft is not None and sft.status in ("ready", "promoted") else None


def schedule_after_policy(db: Session, candidate: ModelVersion) -> Evaluation | None:
    """Starts the evaluation of a new policy against its baseline when the settings ask for one."""
    settings = get_settings()
    if settings.eval_after_ppo_prompts <= 0 or candidate.kind != "policy":
        return None
    baseline = baseline_for(db, candidate)
    if baseline is None:
        return None
    try:
        with db.begin_nested():
            return start_evaluation(
                db,
                model_a_id=candidate.id,
                model_b_id=baseline.id,
                n_prompts=settings.eval_after_ppo_prompts,
                overlap=settings.eval_overlap,
                triggered_by="schedule",
            )
    except EvaluationError as exc:
        log.warning("no evaluation of %s after PPO: %s", candidate.name, exc)
        return None


def promotion_block(db: Session, version: ModelVersion) -> str | None:
    """Says why the promotion gate refuses to promote a policy now; None when it may be promoted."""
    if version.kind != "policy" or not get_settings().promotion_requires_eval_win:
        return None
    current = promoted_version(db, "policy")
    if current is None or current.id == version.id or has_won(db, version.id, current.id):
        return None
    return (
        f"{version.name} has not won a completed blind evaluation against the promoted policy "
        f"{current.name}; start one from the model page (promotion requires a win)"
    )


def counts_by_status(db: Session) -> Counter:
    """Counts evaluations by status (for the dashboard)."""
    return Counter(dict(db.execute(select(Evaluation.status, func.count()).group_by(Evaluation.status)).all()))
