"""Ranking quality: labeler agreement, consensus and warnings, read from the database.

After a batch has been ranked with overlap, admins need to know how far to
trust it before the reward model learns from it. This module loads a batch's
submitted rankings, turns each into dense ranks indexed by its task's output
order (`TaskItem.position`, the same for every labeler whatever order each was
shown), and hands them to the pure metrics of `app.quality.agreement`:
agreement per batch (pairwise, Kendall tau-b, ordinal Krippendorff alpha),
per labeler (with the others and with the others' Borda consensus), over time
(by day), and warnings for labelers who answer much faster than the rest,
agree far less than the batch, or rank by the order outputs were shown in.
Services never commit; the request does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from statistics import median
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Ranking, RankingItem, Task, TaskItem, User
from app.quality.agreement import (
    TieRule,
    batch_agreement,
    borda_consensus,
    is_position_biased,
    labeler_agreement,
    position_bias,
    speed_outliers,
)

# A labeler whose agreement is this far below the batch's is flagged (the paper's labelers sat
# within a few points of each other around 73 %).
LOW_AGREEMENT_GAP = 0.15
# Pairs a labeler must share with others before a low agreement says anything about them.
MIN_PAIRS_FOR_WARNING = 10
# "Much faster than the median": a median time per task under a third of the labelers' median.
SPEED_FACTOR = 3.0


@dataclass(frozen=True, slots=True)
class LoadedRanking:
    """One submitted ranking as the metrics see it: ranks and display order by task output index."""

    ranking_id: int
    task_id: int
    labeler_id: int
    ranks: list[int]  # ranks[i] = rank of the task's i-th output (TaskItem order); 1 = best
    display_order: list[int]  # task output indices in the order this labeler was shown them
    active_seconds: float
    submitted_at: datetime


@dataclass
class LabelerQuality:
    """One labeler's row in the quality tables."""

    labeler_id: int
    username: str
    held_out: bool
    n_rankings: int
    n_tasks_shared: int
    n_pairs: int
    agreement: float | None  # with the other labelers on shared tasks
    consensus_agreement: float | None  # with the Borda consensus of the others
    median_seconds: float | None
    position_bias: float | None  # mean tau-b between shown position and rank; 0 = none
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class QualityWarning:
    """Something about a labeler an admin should look at."""

    kind: str  # "fast", "low_agreement" or "position_bias"
    labeler_id: int
    username: str
    message: str


@dataclass(frozen=True, slots=True)
class DailyAgreement:
    """Agreement on the tasks whose overlap was completed on one day."""

    day: date
    pairwise: float | None
    tau_b: float | None
    n_tasks: int
    n_pairs: int


@dataclass
class BatchQuality:
    """Everything the quality page and API show for one batch."""

    batch_id: int | None
    pairwise: float | None
    tau_b: float | None
    alpha: float | None
    n_tasks: int  # tasks ranked by two or more labelers
    n_pairs: int
    n_rankings: int
    ties: str
    labelers: list[LabelerQuality]
    warnings: list[QualityWarning]
    over_time: list[DailyAgreement]

    def as_dict(self) -> dict[str, Any]:
        """Returns the report as plain JSON-ready data."""
        return {
            "batch_id": self.batch_id,
            "pairwise": self.pairwise,
            "tau_b": self.tau_b,
            "alpha": self.alpha,
            "n_tasks": self.n_tasks,
            "n_pairs": self.n_pairs,
            "n_rankings": self.n_rankings,
            "ties": self.ties,
            "labelers": [vars(row) for row in self.labelers],
            "warnings": [
                {"kind": w.kind, "labeler_id": w.labeler_id, "username": w.username, "message": w.message}
                for w in self.warnings
            ],
            "over_time": [
                {
                    "day": d.day.isoformat(),
                    "pairwise": d.pairwise,
                    "tau_b": d.tau_b,
                    "n_tasks": d.n_tasks,
                    "n_pairs": d.n_pairs,
                }
                for d in self.over_time
            ],
        }


def load_rankings(db: Session, batch_id: int | None = None) -> list[LoadedRanking]:
    """Loads the submitted rankings of a batch (all batches when None), in output-index form."""
    task_filter = [Task.kind == "ranking"] + ([Task.batch_id == batch_id] if batch_id is not None else [])
    output_index: dict[int, dict[int, int]] = defaultdict(dict)  # task_id -> completion_id -> index
    for task_id, completion_id in db.execute(
        select(TaskItem.task_id, TaskItem.completion_id)
        .join(Task, Task.id == TaskItem.task_id)
        .where(*task_filter)
        .order_by(TaskItem.task_id, TaskItem.position, TaskItem.id)
    ):
        outputs = output_index[task_id]
        outputs[completion_id] = len(outputs)
    rows = db.execute(
        select(
            Ranking.id,
            Ranking.task_id,
            Ranking.labeler_id,
            Ranking.active_seconds,
            Ranking.created_at,
            RankingItem.completion_id,
            RankingItem.rank,
            RankingItem.position,
        )
        .join(Task, Task.id == Ranking.task_id)
        .join(RankingItem, RankingItem.ranking_id == Ranking.id)
        .where(*task_filter)
        .order_by(Ranking.id, RankingItem.position)
    )
    grouped: dict[int, tuple[tuple, list[tuple[int, int, int]]]] = {}
    for rid, task_id, labeler_id, seconds, at, completion_id, rank, position in rows:
        head = grouped.setdefault(rid, ((task_id, labeler_id, seconds, at), []))
        head[1].append((completion_id, rank, position))
    loaded = []
    for rid, ((task_id, labeler_id, seconds, at), items) in grouped.items():
        outputs = output_index.get(task_id, {})
        # A ranking that does not cover exactly its task's outputs cannot be compared; it is left out.
        if len(items) != len(outputs) or any(cid not in outputs for cid, _r, _p in items):
            continue
        ranks = [0] * len(outputs)
        for cid, rank, _position in items:
            ranks[outputs[cid]] = rank
        shown = [outputs[cid] for cid, _rank, _position in items]  # items are in shown order
        loaded.append(LoadedRanking(rid, task_id, labeler_id, ranks, shown, float(seconds or 0.0), at))
    return loaded


def task_rankings(rankings: Iterable[LoadedRanking]) -> dict[int, dict[int, list[int]]]:
    """Groups rankings as {task_id: {labeler_id: ranks}}, the shape the agreement metrics take."""
    grouped: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for r in rankings:
        grouped[r.task_id][r.labeler_id] = r.ranks
    return dict(grouped)


def consensus_by_task(rankings: Iterable[LoadedRanking]) -> dict[int, list[int]]:
    """Returns the Borda consensus ranks of every task with at least one ranking."""
    return {
        task_id: borda_consensus(list(by_labeler.values())) for task_id, by_labeler in task_rankings(rankings).items()
    }


def _day(at: datetime) -> date:
    return at.date()


def agreement_over_time(rankings: Sequence[LoadedRanking], ties: TieRule = "exclude") -> list[DailyAgreement]:
    """Returns agreement per day, each overlapping task counted on the day its last ranking arrived."""
    grouped = task_rankings(rankings)
    last: dict[int, datetime] = {}
    for r in rankings:
        if r.task_id not in last or r.submitted_at > last[r.task_id]:
            last[r.task_id] = r.submitted_at
    by_day: dict[date, dict[int, dict[int, list[int]]]] = defaultdict(dict)
    for task_id, by_labeler in grouped.items():
        if len(by_labeler) >= 2:
            by_day[_day(last[task_id])][task_id] = by_labeler
    out = []
    for day in sorted(by_day):
        found = batch_agreement(by_day[day], ties)
        out.append(DailyAgreement(day, found.pairwise, found.tau_b, found.n_tasks, found.n_pairs))
    return out


def _percent(value: float) -> str:
    return f"{value * 100:.0f} %"


def quality_report(
    db: Session,
    batch_id: int | None,
    ties: TieRule = "exclude",
    *,
    gap: float = LOW_AGREEMENT_GAP,
    min_pairs: int = MIN_PAIRS_FOR_WARNING,
    speed_factor: float = SPEED_FACTOR,
) -> BatchQuality:
    """Measures agreement and checks labelers on one batch's rankings (all batches when None)."""
    rankings = load_rankings(db, batch_id)
    grouped = task_rankings(rankings)
    overall = batch_agreement(grouped, ties)
    per_labeler = labeler_agreement(grouped, ties)
    by_labeler: dict[int, list[LoadedRanking]] = defaultdict(list)
    for r in rankings:
        by_labeler[r.labeler_id].append(r)
    users = {u.id: u for u in db.scalars(select(User).where(User.id.in_(list(by_labeler))))} if by_labeler else {}
    fast = set(
        speed_outliers({lid: [r.active_seconds for r in rs] for lid, rs in by_labeler.items()}, factor=speed_factor)
    )
    typical = median(median(r.active_seconds for r in rs) for rs in by_labeler.values()) if by_labeler else None
    rows: list[LabelerQuality] = []
    warnings: list[QualityWarning] = []
    for lid, rs in sorted(by_labeler.items(), key=lambda item: users[item[0]].username):
        user = users[lid]
        found = per_labeler.get(lid)
        orders, ranks = [r.display_order for r in rs], [r.ranks for r in rs]
        row = LabelerQuality(
            labeler_id=lid,
            username=user.username,
            held_out=user.held_out,
            n_rankings=len(rs),
            n_tasks_shared=found.n_tasks if found else 0,
            n_pairs=found.n_pairs if found else 0,
            agreement=found.mean_agreement if found else None,
            consensus_agreement=found.consensus_agreement if found else None,
            median_seconds=median(r.active_seconds for r in rs),
            position_bias=position_bias(orders, ranks),
        )

        def warn(kind: str, message: str, row: LabelerQuality = row) -> None:
            row.warnings.append(kind)
            warnings.append(QualityWarning(kind, row.labeler_id, row.username, message))

        if lid in fast:
            warn(
                "fast",
                f"{user.username} takes a median {row.median_seconds:.0f} s per ranking, "
                f"under 1/{speed_factor:g} of the labelers' median ({typical:.0f} s)",
            )
        if (
            row.agreement is not None
            and overall.pairwise is not None
            and row.n_pairs >= min_pairs
            and row.agreement < overall.pairwise - gap
        ):
            warn(
                "low_agreement",
                f"{user.username} agrees with others on {_percent(row.agreement)} of pairs, "
                f"against {_percent(overall.pairwise)} for the batch",
            )
        if is_position_biased(orders, ranks):
            lean = "first" if (row.position_bias or 0) > 0 else "last"
            warn(
                "position_bias",
                f"{user.username}'s ranks follow the display order (mean tau-b "
                f"{row.position_bias:+.2f}): outputs shown {lean} are ranked better",
            )
        rows.append(row)
    return BatchQuality(
        batch_id=batch_id,
        pairwise=overall.pairwise,
        tau_b=overall.tau_b,
        alpha=overall.alpha,
        n_tasks=overall.n_tasks,
        n_pairs=overall.n_pairs,
        n_rankings=len(rankings),
        ties=ties,
        labelers=rows,
        warnings=warnings,
        over_time=agreement_over_time(rankings, ties),
    )


def set_held_out(db: Session, labeler_id: int, held_out: bool | None = None) -> User | None:
    """Marks a labeler held out (their rankings go to validation only), or toggles when None; None if no labeler."""
    user = db.get(User, labeler_id)
    if user is None or user.role != "labeler":
        return None
    user.held_out = (not user.held_out) if held_out is None else held_out
    db.flush()
    return user


def labelers_overview(db: Session) -> list[dict[str, Hashable | float | None]]:
    """Lists every labeler with held-out status, rankings submitted, agreement and gold accuracy over all batches."""
    from app.quality.gold import gold_accuracy_by_labeler

    report = quality_report(db, None)
    by_id = {row.labeler_id: row for row in report.labelers}
    on_gold = gold_accuracy_by_labeler(db)
    out = []
    for user in db.scalars(select(User).where(User.role == "labeler").order_by(User.username)):
        row = by_id.get(user.id)
        out.append(
            {
                "id": user.id,
                "username": user.username,
                "held_out": user.held_out,
                "is_active": user.is_active,
                "n_rankings": row.n_rankings if row else 0,
                "n_pairs": row.n_pairs if row else 0,
                "agreement": row.agreement if row else None,
                "consensus_agreement": row.consensus_agreement if row else None,
                "warnings": row.warnings if row else [],
                "gold_checks": on_gold[user.id].n_checks if user.id in on_gold else 0,
                "gold_accuracy": on_gold[user.id].accuracy if user.id in on_gold else None,
            }
        )
    return out
