"""What each trainer reads: splits by source user, held-out labelers, snapshot bounds, gold checks, evaluations.

The data is made the way the product makes it: prompts imported through the
hygiene rules (which assign each source user's prompts to one split), a batch
started and sampled, demonstrations and rankings submitted through the
labeling service, gold marked through the gold service, evaluations started
through the evaluation service. `worker.jobs` hands the trainers `train` and
`valid` only, and PPO the train split's prompts (valid for its evaluation),
so a test-split prompt must never show up in those.
"""

from __future__ import annotations

import itertools
import json
import uuid

from sqlalchemy import select

from app.collection.batches import create_batch, import_prompts, start_batch
from app.collection.hygiene import assign_split
from app.collection.sampling import open_for_labeling, prompts_needing_samples, store_samples
from app.labeling import leases, submissions
from app.models import Demonstration, Prompt, PromptBatch, Ranking, Task
from app.quality import evaluations, gold
from app.quality.report import set_held_out
from app.training import data as training
from tests.factories import ModelVersionFactory, UserFactory
from tests.test_evaluations import judge, sample_by_hand, two_models
from tests.test_quality import rank

SPLITS = ("train", "valid", "test")


def source_user_in(split: str, tag: str) -> str:
    """A source user id that the import's hash puts in `split`."""
    return next(u for i in itertools.count() if assign_split(u := f"{tag}-user-{i}") == split)


def collect(db, per_user: int = 2, tag: str | None = None) -> dict:
    """Imports prompts from one source user per split, samples 4 outputs each and opens labeling for two labelers.

    Returns the batch and, per split, the prompt texts the import stored there.
    """
    tag = tag or uuid.uuid4().hex[:8]
    policy = ModelVersionFactory(kind="base", status="promoted")
    batch = create_batch(db, name=f"collect-{tag}", k=4, overlap=2, wants_demonstrations=True, wants_rankings=True)
    users = {split: source_user_in(split, tag) for split in SPLITS}
    lines = [
        json.dumps(
            {"text": f"{split} question {i} from {tag}: what is {i} + {len(split)}?", "source_user_id": users[split]}
        )
        for split in SPLITS
        for i in range(per_user)
    ]
    outcome = import_prompts(db, batch, "\n".join(lines).encode(), "jsonl")
    assert outcome.ok and outcome.stored == 3 * per_user, outcome.errors
    start_batch(db, batch)
    # What the sampling job does, without the model: K outputs per prompt, then labeling opens.
    todo = prompts_needing_samples(db, batch, policy.id)
    store_samples(db, policy.id, {pid: [f"output {j} to {pid}" for j in range(4)] for pid, _ in todo}, {})
    open_for_labeling(db, batch)
    stored = db.scalars(select(Prompt).where(Prompt.batch_id == batch.id)).all()
    texts = {split: {p.text for p in stored if p.split == split} for split in SPLITS}
    # The import put each user's prompts in that user's split (what the rest of this file relies on).
    assert {split: len(found) for split, found in texts.items()} == dict.fromkeys(SPLITS, per_user)
    return {"batch": batch, "texts": texts}


def demonstrate_all(db, labeler, batch: PromptBatch) -> list[Demonstration]:
    """The labeler writes a demonstration for every demonstration task of the batch."""
    demos = []
    while (assignment := leases.lease_next_task(db, labeler, "demonstration")) is not None:
        demos.append(submissions.submit_demonstration(db, labeler, assignment.id, f"answer by {labeler.username}"))
    assert demos and all(d.task_id in task_ids(db, batch, "demonstration") for d in demos)
    return demos


def rank_all(db, labeler, batch: PromptBatch) -> list[Ranking]:
    """The labeler ranks every ordinary ranking task of the batch (output 1 best)."""
    return [
        rank(db, labeler, task, [1, 2, 3, 4])
        for task in db.scalars(
            select(Task)
            .where(Task.batch_id == batch.id, Task.kind == "ranking", Task.is_gold.is_(False))
            .order_by(Task.id)
        )
    ]


def task_ids(db, batch: PromptBatch, kind: str) -> set[int]:
    return set(db.scalars(select(Task.id).where(Task.batch_id == batch.id, Task.kind == kind)))


def prompts_of(rows) -> set[str]:
    """The prompt texts of demonstration pairs or ranking rows."""
    return {r[0] if isinstance(r, tuple) else r.prompt for r in rows}


# --- splits -----------------------------------------------------------------------------------------


def test_test_split_prompts_never_reach_sft_rm_or_ppo_data(db):
    found = collect(db)
    texts = found["texts"]
    labeler = UserFactory()
    demonstrate_all(db, labeler, found["batch"])
    rank_all(db, labeler, found["batch"])

    demos, demo_snap = training.demonstrations(db)
    rankings, rank_snap = training.rankings(db)
    ppo_train, ppo_valid = training.prompts_for_ppo(db, "train"), training.prompts_for_ppo(db, "valid")

    for split in SPLITS:
        assert prompts_of(demos[split]) == texts[split]
        assert prompts_of(rankings[split]) == texts[split]
    # The trainers read train and valid (worker.jobs): the test split's prompts appear in neither, nor in PPO's.
    fed = prompts_of(demos["train"] + demos["valid"]) | prompts_of(rankings["train"] + rankings["valid"])
    assert not fed & texts["test"]
    assert set(ppo_train) == texts["train"] and set(ppo_valid) == texts["valid"]
    assert demo_snap.counts == rank_snap.counts == {"train": 2, "valid": 2, "test": 2}
    # Each ranking row carries its K outputs and ranks, in the order the labeler was shown nothing special.
    row = rankings["train"][0]
    assert len(row.completions) == 4 and sorted(row.ranks) == [1, 2, 3, 4]
    assert row.labeler == f"labeler-{labeler.id}"


def test_held_out_labelers_rankings_go_to_validation_not_training(db):
    found = collect(db)
    texts = found["texts"]
    regular, held = UserFactory(), UserFactory()
    set_held_out(db, held.id, True)
    ours = {r.id for r in rank_all(db, held, found["batch"])}
    theirs = {r.id for r in rank_all(db, regular, found["batch"])}

    rankings, snap = training.rankings(db)
    by_id = {split: {r.ranking_id: r for r in rows} for split, rows in rankings.items()}
    # The held-out labeler's train-split rankings move to valid; their valid and test ones stay where they are.
    assert not ours & set(by_id["train"])
    assert {by_id["valid"][i].prompt for i in ours & set(by_id["valid"])} == texts["train"] | texts["valid"]
    assert {by_id["test"][i].prompt for i in ours & set(by_id["test"])} == texts["test"]
    # The regular labeler's rankings follow the prompts' split.
    assert {r.prompt for r in by_id["train"].values()} == texts["train"] and set(by_id["train"]) <= theirs
    assert snap.counts == {"train": 2, "valid": 2 + 4, "test": 2 + 2}


# --- snapshot bounds ------------------------------------------------------------------------------------


def test_the_snapshot_bound_includes_the_row_at_it_and_excludes_rows_added_after(db):
    found = collect(db)
    first, second = UserFactory(), UserFactory()
    early_demos = demonstrate_all(db, first, found["batch"])
    early_rankings = rank_all(db, first, found["batch"])
    _, demo_snap = training.demonstrations(db)
    _, rank_snap = training.rankings(db)
    demo_bound, rank_bound = demo_snap.max_ids["demonstration"], rank_snap.max_ids["ranking"]
    assert demo_bound == max(d.id for d in early_demos) and rank_bound == max(r.id for r in early_rankings)

    # More labels arrive after the model was trained on the snapshot.
    late_demos = demonstrate_all(db, second, found["batch"])
    late_rankings = rank_all(db, second, found["batch"])
    assert min(d.id for d in late_demos) > demo_bound and min(r.id for r in late_rankings) > rank_bound

    demos, again = training.demonstrations(db, max_id=demo_bound)
    rankings, rank_again = training.rankings(db, max_id=rank_bound)
    assert again.as_dict() == demo_snap.as_dict() and rank_again.as_dict() == rank_snap.as_dict()
    kept = {r.ranking_id for rows in rankings.values() for r in rows}
    assert kept == {r.id for r in early_rankings}  # the one at the bound included, the later ones not
    assert rank_bound in kept
    assert sum(len(rows) for rows in demos.values()) == len(early_demos)
    assert not any(f"by {second.username}" in text for rows in demos.values() for _, text in rows)

    # One below the bound leaves exactly the last row out.
    fewer, _ = training.rankings(db, max_id=rank_bound - 1)
    assert {r.ranking_id for rows in fewer.values() for r in rows} == kept - {rank_bound}
    # Unbounded, everything is there; and the schedule counts only what came after the snapshot as new.
    everything, _ = training.rankings(db)
    assert {r.ranking_id for rows in everything.values() for r in rows} == kept | {r.id for r in late_rankings}
    sft = ModelVersionFactory(kind="sft", status="ready", data_snapshot=demo_snap.as_dict())
    ModelVersionFactory(kind="rm", status="ready", parent_id=sft.id, data_snapshot=rank_snap.as_dict())
    assert "rm" in training.due_kinds(db, min_demonstrations=10**6, min_rankings=len(late_rankings))
    assert "rm" not in training.due_kinds(db, min_demonstrations=10**6, min_rankings=len(late_rankings) + 1)
    assert "sft" in training.due_kinds(db, min_demonstrations=len(late_demos), min_rankings=10**6)
    assert "sft" not in training.due_kinds(db, min_demonstrations=len(late_demos) + 1, min_rankings=10**6)


# --- gold checks and evaluations --------------------------------------------------------------------------


def test_with_dpo_chosen_the_schedule_trains_the_policy_on_new_rankings_without_a_reward_model(db, monkeypatch):
    from app.config import get_settings

    monkeypatch.setenv("INSTRUCTLOOP_RETRAIN_POLICY_ALGORITHM", "dpo")
    get_settings.cache_clear()
    try:
        found = collect(db)
        first, second = UserFactory(), UserFactory()
        demonstrate_all(db, first, found["batch"])
        early = rank_all(db, first, found["batch"])
        _, demo_snap = training.demonstrations(db)
        _, rank_snap = training.rankings(db)
        sft = ModelVersionFactory(kind="sft", status="ready", data_snapshot=demo_snap.as_dict())
        # No DPO policy yet: every ranking is new to it; never a reward model.
        assert training.due_kinds(db, min_demonstrations=10**6, min_rankings=len(early)) == ["dpo"]
        assert training.due_kinds(db, min_demonstrations=10**6, min_rankings=len(early) + 1) == []
        ModelVersionFactory(kind="policy", status="ready", parent_id=sft.id, data_snapshot=rank_snap.as_dict())
        assert training.due_kinds(db, min_demonstrations=10**6, min_rankings=1) == []  # trained on all of them
        late = rank_all(db, second, found["batch"])
        assert training.due_kinds(db, min_demonstrations=10**6, min_rankings=len(late)) == ["dpo"]
        # A newer SFT model makes the policy due again, whatever the count.
        ModelVersionFactory(kind="sft", status="ready", data_snapshot=demo_snap.as_dict())
        assert training.due_kinds(db, min_demonstrations=10**6, min_rankings=10**6) == ["dpo"]
        [run] = training.start_due_runs(db)
        assert run.kind == "dpo" and run.triggered_by == "schedule"
    finally:
        get_settings.cache_clear()


def test_gold_checks_are_left_out_and_the_gold_answer_stays_in(db):
    found = collect(db)
    batch = found["batch"]
    expert = UserFactory()
    train_task = db.scalar(
        select(Task)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.batch_id == batch.id, Task.kind == "ranking", Prompt.split == "train")
        .order_by(Task.id)
        .limit(1)
    )
    answer = rank(db, expert, train_task, [1, 2, 3, 4])
    gold.mark_ranking_gold(db, answer.id, None, batch.id)
    batch.gold_share = 1.0  # every labeler's first ranking lease is the gold check
    checker = UserFactory()
    check = rank(db, checker, train_task, [2, 1, 3, 4])
    assert check.is_gold
    ordinary = rank_all(db, checker, batch)  # the rest of the batch, as ordinary work

    rankings, snap = training.rankings(db)
    ids = {r.ranking_id for rows in rankings.values() for r in rows}
    assert check.id not in ids
    assert answer.id in ids and {r.id for r in ordinary} <= ids
    assert ids == {answer.id} | {r.id for r in ordinary}
    assert sum(snap.counts.values()) == len(ids)


def test_evaluation_batches_add_nothing_to_training_data(db):
    found = collect(db)
    labeler = UserFactory()
    demonstrate_all(db, labeler, found["batch"])
    rank_all(db, labeler, found["batch"])

    def everything():
        demos, demo_snap = training.demonstrations(db)
        rankings, rank_snap = training.rankings(db)
        return (
            demos,
            {s: [(r.ranking_id, r.prompt) for r in rows] for s, rows in rankings.items()},
            demo_snap.as_dict(),
            rank_snap.as_dict(),
            sorted(training.prompts_for_ppo(db, "train")),
            sorted(training.prompts_for_ppo(db, "valid")),
        )

    before = everything()
    a, b = two_models(db)
    for split in ("test", "valid"):
        evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=2, prompt_split=split)
        assert sample_by_hand(db, evaluation) == 2
        for _ in range(2):
            judge(db, labeler, "a")
    # The evaluation prompts are copies of held-out prompts, judged blind, and none of it is training data.
    copies = db.scalars(
        select(Prompt).join(PromptBatch, PromptBatch.id == Prompt.batch_id).where(PromptBatch.purpose == "evaluation")
    ).all()
    assert len(copies) == 4 and {p.split for p in copies} == {"test", "valid"}
    assert not {p.text for p in copies} & found["texts"]["train"]
    assert everything() == before


# --- what the jobs hand the trainers ---------------------------------------------------------------------


def test_the_training_jobs_hand_their_trainers_no_test_split_prompt(committed_session, monkeypatch):
    """worker.jobs on committed data, with each trainer replaced by a recorder of what it was given.

    The trainers themselves are tested on tiny models elsewhere; what is under test here is the job's choice
    of rows, which a real trainer would silently learn from.
    """
    import worker.train_ppo
    import worker.train_rm
    import worker.train_sft
    from app.registry import versions as registry
    from app.runs import start_run
    from tests.factories import bind_factories
    from worker import jobs

    db = committed_session
    bind_factories(db)
    found = collect(db)
    texts = found["texts"]
    labeler, held = UserFactory(), UserFactory(held_out=True)
    demonstrate_all(db, labeler, found["batch"])
    rank_all(db, labeler, found["batch"])
    rank_all(db, held, found["batch"])
    db.commit()
    given: dict[str, dict] = {}

    def recorder(kind):
        def train(model_path, *args, **kwargs):
            given[kind] = {"args": args, **kwargs}
            return {}

        return train

    monkeypatch.setattr(worker.train_sft, "train_sft", recorder("sft"))
    monkeypatch.setattr(worker.train_rm, "train_rm", recorder("rm"))
    monkeypatch.setattr(worker.train_ppo, "train_ppo", recorder("ppo"))

    def run(kind, body):
        run_id = start_run(db, kind).id
        db.commit()
        _, version_id = body(run_id, lambda *a, **k: None)
        if version_id is not None:
            registry.mark_ready(db, version_id)
            db.commit()

    run("sft", jobs.run_sft)
    run("rm", jobs.run_rm)
    run("ppo", jobs.run_ppo)

    sft_train, sft_valid = given["sft"]["args"][:2]
    assert prompts_of(sft_train) == texts["train"] and prompts_of(sft_valid) == texts["valid"]
    rm_train, rm_valid = given["rm"]["args"][:2]
    assert {e.prompt for e in rm_train} == texts["train"]
    assert {e.prompt for e in rm_valid} == texts["train"] | texts["valid"]  # the held-out labeler's train ones
    assert {e.labeler for e in rm_train} == {f"labeler-{labeler.id}"}
    assert prompts_of(given["rm"]["demonstrations"]) == texts["train"]
    ppo_prompts = given["ppo"]["args"][1]
    assert set(ppo_prompts) == texts["train"] and set(given["ppo"]["eval_prompts"]) == texts["valid"]
    for call in given.values():
        assert not any(t in json.dumps(call, default=repr) for t in texts["test"])
