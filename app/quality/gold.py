"""Gold tasks: rankings with a known answer, mixed into the queue to measure each labeler's accuracy.

An admin marks a submitted ranking (an expert's, say) or the consensus of a
task's rankings as the known answer of its task. The task then leaves the
normal queue and becomes a check: when a labeler leases a ranking task of the
batch, with probability `batch.gold_share` they receive one of the batch's
gold tasks they have not done instead (`app.labeling.leases`), shown exactly
like any other task of the batch. Their answer is stored as a ranking marked
`is_gold`, which does not count towards the task's overlap and is left out of
reward-model training (the gold prompts would otherwise weigh once per
labeler). A labeler's gold accuracy is the share of output pairs they order as
the known answer does, ties left out, as in the agreement figures. Services
never commit; the request does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db import get_existing
from app.errors import FieldError
from app.models import GoldAnswer, Prompt, PromptBatch, Ranking, RankingItem, Task, TaskItem, User, utcnow
from app.quality.agreement import borda_consensus, pair_counts
from app.quality.stats import Estimate, proportion_with_interval

# Consensus needs at least this many rankings of the task to stand in for a known answer.
MIN_CONSENSUS_RANKINGS = 3


class GoldError(FieldError):
    """A user-caused problem marking gold; `field` names what is wrong, `status` the HTTP code."""


@dataclass
class GoldTaskRow:
    """One gold task as the admin sees it: its prompt, its answer and how labelers do on it."""

    task_id: int
    prompt_id: int
    prompt: str
    source: str
    source_ranking_id: int | None
    answer: dict[int, int]  # completion id -> rank
    n_checks: int
    accuracy: float | None  # pooled over every check of this task


@dataclass
class LabelerGold:
    """One labeler's record on gold: checks answered, pairs agreeing with the known answer."""

    labeler_id: int
    username: str
    n_checks: int
    agreeing_pairs: float
    counted_pairs: int
    accuracy: Estimate  # agreeing / counted pairs with a Wilson interval
    per_check: list[float] = field(default_factory=list)  # accuracy of each check, oldest first

    def as_dict(self) -> dict[str, Any]:
        return {
            "labeler_id": self.labeler_id,
            "username": self.username,
            "n_checks": self.n_checks,
            "agreeing_pairs": self.agreeing_pairs,
            "counted_pairs": self.counted_pairs,
            "accuracy": self.accuracy.value,
            "low": self.accuracy.low,
            "high": self.accuracy.high,
        }


def _ranking_task(db: Session, ranking_id: int, batch_id: int | None) -> tuple[Ranking, Task]:
    ranking = db.get(Ranking, ranking_id)
    if ranking is None or (batch_id is not None and _batch_of_task(db, ranking.task_id) != batch_id):
        raise GoldError("ranking_id", f"no ranking {ranking_id} in this batch", status=404)
    if ranking.is_gold:
        raise GoldError("ranking_id", f"ranking {ranking_id} is a labeler's answer to a gold check, not an answer key")
    task = get_existing(db, Task, ranking.task_id, with_for_update=True)  # rankings.task_id is a foreign key
    return ranking, task


def _batch_of_task(db: Session, task_id: int) -> int | None:
    return db.scalar(select(Task.batch_id).where(Task.id == task_id))


def _set_gold(
    db: Session, task: Task, ranks: dict[int, int], source: str, ranking_id: int | None, admin: User | None
) -> GoldAnswer:
    batch = get_existing(db, PromptBatch, task.batch_id)  # tasks.batch_id is a non-null foreign key
    if batch.purpose != "collection":
        raise GoldError("task_id", "only tasks of collection batches can be gold")
    answer = db.scalar(select(GoldAnswer).where(GoldAnswer.task_id == task.id))
    if answer is None:
        answer = GoldAnswer(task_id=task.id)
        db.add(answer)
    answer.ranks = {str(cid): rank for cid, rank in ranks.items()}
    answer.source, answer.source_ranking_id = source, ranking_id
    answer.created_by_id = admin.id if admin else None
    answer.created_at = utcnow()
    # Out of the normal queue: from now on it is served only as a check, at the batch's gold share.
    task.is_gold, task.is_open = True, False
    db.flush()
    from app.collection.batches import complete_if_done

    complete_if_done(db, task.batch_id)
    return answer


def mark_ranking_gold(db: Session, ranking_id: int, admin: User | None, batch_id: int | None = None) -> GoldAnswer:
    """Makes a submitted ranking the known answer of its task (replacing an earlier answer)."""
    ranking, task = _ranking_task(db, ranking_id, batch_id)
    if task.kind != "ranking":
        raise GoldError("ranking_id", "only ranking tasks can be gold")
    ranks = dict(
        db.execute(
            select(RankingItem.completion_id, RankingItem.rank).where(RankingItem.ranking_id == ranking.id)
        ).all()
    )
    if len(set(ranks.values())) < 2:
        raise GoldError("ranking_id", f"ranking {ranking_id} ties every output; a gold answer must order some pair")
    return _set_gold(db, task, ranks, "ranking", ranking.id, admin)


def mark_consensus_gold(
    db: Session,
    task_id: int,
    admin: User | None,
    batch_id: int | None = None,
    min_rankings: int = MIN_CONSENSUS_RANKINGS,
) -> GoldAnswer:
    """Makes the Borda consensus of a task's rankings its known answer; needs `min_rankings` of them."""
    task = db.get(Task, task_id, with_for_update=True)
    if task is None or (batch_id is not None and task.batch_id != batch_id):
        raise GoldError("task_id", f"no task {task_id} in this batch", status=404)
    if task.kind != "ranking":
        raise GoldError("task_id", "only ranking tasks can be gold")
    outputs = list(
        db.scalars(
            select(TaskItem.completion_id).where(TaskItem.task_id == task.id).order_by(TaskItem.position, TaskItem.id)
        )
    )
    by_ranking: dict[int, dict[int, int]] = defaultdict(dict)
    for rid, cid, rank in db.execute(
        select(Ranking.id, RankingItem.completion_id, RankingItem.rank)
        .join(RankingItem, RankingItem.ranking_id == Ranking.id)
        .where(Ranking.task_id == task.id, Ranking.is_gold.is_(False))
    ):
        by_ranking[rid][cid] = rank
    complete = [[ranks[cid] for cid in outputs] for ranks in by_ranking.values() if set(ranks) == set(outputs)]
    if len(complete) < min_rankings:
        raise GoldError(
            "task_id",
            f"task {task_id} has {len(complete)} ranking(s); a consensus answer needs at least {min_rankings}",
            status=409,
        )
    consensus = borda_consensus(complete)
    if len(set(consensus)) < 2:
        raise GoldError("task_id", f"the rankings of task {task_id} cancel out (every output tied)", status=409)
    return _set_gold(db, task, dict(zip(outputs, consensus, strict=True)), "consensus", None, admin)


def unmark_gold(db: Session, task_id: int, batch_id: int | None = None) -> Task:
    """Turns a gold task back into an ordinary one (its answer is deleted; past checks stay recorded)."""
    task = db.get(Task, task_id, with_for_update=True)
    if task is None or (batch_id is not None and task.batch_id != batch_id) or not task.is_gold:
        raise GoldError("task_id", f"no gold task {task_id} in this batch", status=404)
    db.execute(delete(GoldAnswer).where(GoldAnswer.task_id == task.id))
    task.is_gold = False
    task.is_open = task.done_count < task.needed
    db.flush()
    return task


def _answers(db: Session, batch_id: int | None) -> dict[int, GoldAnswer]:
    query = select(GoldAnswer).join(Task, Task.id == GoldAnswer.task_id)
    if batch_id is not None:
        query = query.where(Task.batch_id == batch_id)
    return {a.task_id: a for a in db.scalars(query)}


def _checks(db: Session, task_ids: list[int]) -> dict[int, tuple[int, int, dict[int, int]]]:
    """Loads the gold-check rankings of some tasks: {ranking id: (task id, labeler id, {completion: rank})}."""
    checks: dict[int, tuple[int, int, dict[int, int]]] = {}
    if not task_ids:
        return checks
    for rid, task_id, labeler_id, cid, rank in db.execute(
        select(Ranking.id, Ranking.task_id, Ranking.labeler_id, RankingItem.completion_id, RankingItem.rank)
        .join(RankingItem, RankingItem.ranking_id == Ranking.id)
        .where(Ranking.task_id.in_(task_ids), Ranking.is_gold.is_(True))
        .order_by(Ranking.id)
    ):
        checks.setdefault(rid, (task_id, labeler_id, {}))[2][cid] = rank
    return checks


def score_check(answer: dict[int, int], given: dict[int, int]) -> tuple[float, int]:
    """Returns (agreeing pairs, counted pairs) of a labeler's ranks against a known answer; ties left out."""
    outputs = sorted(answer)
    if set(given) != set(outputs):
        return 0.0, 0
    return pair_counts([answer[c] for c in outputs], [given[c] for c in outputs], "exclude")


def gold_report(db: Session, batch_id: int | None = None) -> tuple[list[GoldTaskRow], list[LabelerGold]]:
    """Returns a batch's gold tasks (all batches when None) and every labeler's accuracy on them."""
    answers = _answers(db, batch_id)
    checks = _checks(db, list(answers))
    task_scores: dict[int, list[tuple[float, int]]] = defaultdict(list)
    labeler_scores: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for task_id, labeler_id, given in checks.values():
        known = {int(cid): rank for cid, rank in answers[task_id].ranks.items()}
        score = score_check(known, given)
        task_scores[task_id].append(score)
        labeler_scores[labeler_id].append(score)
    prompts = (
        {
            task_id: (prompt_id, text)
            for task_id, prompt_id, text in db.execute(
                select(Task.id, Prompt.id, Prompt.text)
                .join(Prompt, Prompt.id == Task.prompt_id)
                .where(Task.id.in_(list(answers)))
            )
        }
        if answers
        else {}
    )
    tasks = []
    for task_id, answer in sorted(answers.items()):
        scores = task_scores.get(task_id, [])
        counted = sum(c for _, c in scores)
        tasks.append(
            GoldTaskRow(
                task_id=task_id,
                prompt_id=prompts[task_id][0],
                prompt=prompts[task_id][1],
                source=answer.source,
                source_ranking_id=answer.source_ranking_id,
                answer={int(cid): rank for cid, rank in answer.ranks.items()},
                n_checks=len(scores),
                accuracy=sum(a for a, _ in scores) / counted if counted else None,
            )
        )
    users = (
        dict(db.execute(select(User.id, User.username).where(User.id.in_(list(labeler_scores)))).all())
        if labeler_scores
        else {}
    )
    labelers = []
    for labeler_id, scores in labeler_scores.items():
        agree, counted = sum(a for a, _ in scores), sum(c for _, c in scores)
        labelers.append(
            LabelerGold(
                labeler_id=labeler_id,
                username=users.get(labeler_id, f"#{labeler_id}"),
                n_checks=len(scores),
                agreeing_pairs=agree,
                counted_pairs=counted,
                # Pairs within one check are not independent, so this interval is on the optimistic side.
                accuracy=proportion_with_interval(round(agree), counted),
                per_check=[a / c for a, c in scores if c],
            )
        )
    labelers.sort(key=lambda row: row.username)
    return tasks, labelers


def gold_accuracy_by_labeler(db: Session) -> dict[int, LabelerGold]:
    """Returns each labeler's accuracy on every gold task of every batch, by labeler id."""
    return {row.labeler_id: row for row in gold_report(db, None)[1]}


def candidate_tasks(db: Session, batch_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """Lists a batch's ranking tasks that could become gold: their rankings, most-ranked first."""
    counts = (
        select(Ranking.task_id, func.count().label("n"), func.max(Ranking.id).label("last_ranking_id"))
        .where(Ranking.is_gold.is_(False))
        .group_by(Ranking.task_id)
        .subquery()
    )
    rows = db.execute(
        select(Task.id, Prompt.text, counts.c.n, counts.c.last_ranking_id)
        .join(counts, counts.c.task_id == Task.id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.batch_id == batch_id, Task.kind == "ranking", Task.is_gold.is_(False))
        .order_by(counts.c.n.desc(), Task.id)
        .limit(limit)
    ).all()
    return [{"task_id": r[0], "prompt": r[1], "n_rankings": r[2], "last_ranking_id": r[3]} for r in rows]
