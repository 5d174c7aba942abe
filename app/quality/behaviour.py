"""How a model version behaves, read from what labelers said about its outputs.

Every ranked output carries a 1-7 Likert score and metadata flags
(hallucination, fails to follow the instruction, harmful advice, ...). Per
model version, this module reports the rate of each flag with a Wilson
interval and the mean Likert score with a t interval, over every ranked
output that version sampled, so admins can read for their own models what
the InstructGPT paper reports (e.g. hallucination 21 % vs 41 %). Gold checks
count like any other ranking: they are labelers' judgments of real outputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Completion, Ranking, RankingItem
from app.quality.stats import Estimate, mean_with_interval, proportion_with_interval
from app.vocabulary import RANKING_FLAGS


@dataclass
class Behaviour:
    """One version's flag rates and mean Likert score over its ranked outputs."""

    model_version_id: int
    n_outputs: int  # ranked outputs (a completion ranked by two labelers counts twice)
    n_rankings: int
    likert: Estimate
    flags: dict[str, Estimate]
    all_unacceptable: Estimate  # rankings with every output marked unacceptable

    def as_dict(self) -> dict[str, Any]:
        def estimate(e: Estimate) -> dict[str, Any]:
            return {"value": e.value, "low": e.low, "high": e.high, "n": e.n}

        return {
            "model_version_id": self.model_version_id,
            "n_outputs": self.n_outputs,
            "n_rankings": self.n_rankings,
            "likert": estimate(self.likert),
            "flags": {name: estimate(e) for name, e in self.flags.items()},
            "all_unacceptable": estimate(self.all_unacceptable),
        }


def model_behaviour(db: Session, version_id: int) -> Behaviour:
    """Returns a version's flag rates and mean Likert score, with 95 % intervals."""
    rows = db.execute(
        select(RankingItem.likert, RankingItem.flags, Ranking.id, Ranking.all_unacceptable)
        .join(Ranking, Ranking.id == RankingItem.ranking_id)
        .join(Completion, Completion.id == RankingItem.completion_id)
        .where(Completion.model_version_id == version_id)
    ).all()
    flagged: Counter[str] = Counter()
    for _likert, flags, _rid, _unacceptable in rows:
        flagged.update(set(flags or ()) & set(RANKING_FLAGS))
    rankings = {rid: unacceptable for _l, _f, rid, unacceptable in rows}
    n = len(rows)
    return Behaviour(
        model_version_id=version_id,
        n_outputs=n,
        n_rankings=len(rankings),
        likert=mean_with_interval([float(likert) for likert, *_ in rows]),
        flags={flag: proportion_with_interval(flagged[flag], n) for flag in RANKING_FLAGS},
        all_unacceptable=proportion_with_interval(sum(bool(u) for u in rankings.values()), len(rankings)),
    )
