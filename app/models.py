"""Every table of the loop, in the order data walks through it.

users and their credentials → prompt batches → prompts → completions (model
samples) → labeling tasks → assignments (leases) → demonstrations and
rankings → training runs → model versions, which sample the next batch.
Constraints make bad states impossible rather than merely unlikely: one
submitted ranking per assignment, ranks 1..9, Likert 1..7, K in 4..9 for
ranking tasks, one promoted model per kind, one active training run per kind.
Relationships are `lazy="raise"` so an N+1 query fails loudly in tests.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from app.vocabulary import (
    ASSIGNMENT_STATES,
    BATCH_PURPOSES,
    BATCH_STATUSES,
    EVALUATION_STATUSES,
    GOLD_SOURCES,
    MODEL_KINDS,
    MODEL_STATUSES,
    PROMPT_CATEGORIES,
    ROLES,
    RUN_KINDS,
    RUN_STATUSES,
    SPLITS,
    TASK_KINDS,
    TRAINING_KINDS,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """Returns the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
        datetime: DateTime(timezone=True),
    }


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # Held-out labelers' rankings go to validation only (RM accuracy on unseen people).
    held_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]
    # Set when an admin hands out a generated password: the pages ask for a new one before anything else.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class UserSession(Base):
    """A login session; the cookie carries a signed random id, stored here hashed."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="raise")


class ApiToken(Base):
    """A bearer token: shown once, stored as a SHA-256 hash, scoped and revocable."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="raise")


class LoginFailure(Base):
    """One failed login, kept for the per-account and per-IP rate limit."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_at", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    ip: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """One admin action: who did what to which target, when and from which address (`app.audit`)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_action_at", "action", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(64))  # the username, kept when the account goes
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ModelVersion(Base):
    """A trained model: base, SFT, reward model or PPO policy."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_in("kind", MODEL_KINDS), name="kind"),
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
        # Exactly one promoted model of each kind (the policy that samples, the RM that scores).
        Index(
            "uq_model_versions_one_promoted",
            "kind",
            unique=True,
            postgresql_where=text("status = 'promoted'"),
            sqlite_where=text("status = 'promoted'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="training")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # Secondary parents, e.g. the RM a policy was trained against: {"rm": id, "sft": id}.
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_snapshot: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_path: Mapped[str] = mapped_column(Text, default="")
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id", use_alter=True))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    # A model brought from outside (issue 16): where it came from, what validation found, or why it failed.
    source: Mapped[str | None] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)


def promoted_version(db: Session, kind: str) -> ModelVersion | None:
    """Returns the promoted version of a kind, if any (at most one: a partial unique index)."""
    return db.scalar(select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.status == "promoted"))


class PromptBatch(Base):
    """A unit of data collection: prompts, how to sample them and how to label them."""

    __tablename__ = "prompt_batches"
    __table_args__ = (
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
        CheckConstraint("k BETWEEN 4 AND 9", name="k_range"),
        CheckConstraint("overlap >= 1", name="overlap_positive"),
        CheckConstraint("extra_overlap_fraction >= 0 AND extra_overlap_fraction <= 1", name="extra_fraction"),
        CheckConstraint("wants_demonstrations OR wants_rankings", name="some_task_kind"),
        CheckConstraint(_in("pii_policy", ("drop", "redact", "flag")), name="pii_policy"),
        CheckConstraint("temperature >= 0 AND top_p > 0 AND top_p <= 1", name="sampling"),
        CheckConstraint("max_new_tokens BETWEEN 1 AND 4096", name="max_new_tokens"),
        CheckConstraint(_in("purpose", BATCH_PURPOSES), name="purpose"),
        CheckConstraint("gold_share >= 0 AND gold_share <= 1", name="gold_share"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="draft")
    wants_demonstrations: Mapped[bool] = mapped_column(Boolean, default=True)
    wants_rankings: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_prompt_writing: Mapped[bool] = mapped_column(Boolean, default=False)
    k: Mapped[int] = mapped_column(Integer, default=4)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    extra_overlap_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    extra_overlap: Mapped[int] = mapped_column(Integer, default=1)
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    top_p: Mapped[float] = mapped_column(Float, default=0.95)
    max_new_tokens: Mapped[int] = mapped_column(Integer, default=48)
    policy_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # The share of ranking leases that serve one of the batch's gold tasks instead (quality checks).
    gold_share: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    purpose: Mapped[str] = mapped_column(String(16), default="collection", server_default=text("'collection'"))
    pii_policy: Mapped[str] = mapped_column(String(8), default="drop")
    hygiene_report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def _single_turn_default(context: Any) -> list[dict[str, str]]:
    # A context-sensitive default: the row's own text as its one user message (bulk inserts too).
    return [{"role": "user", "content": context.get_current_parameters()["text"]}]


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        CheckConstraint(_in("category", PROMPT_CATEGORIES), name="category"),
        CheckConstraint(_in("split", SPLITS), name="split"),
        CheckConstraint("length(text) > 0", name="text_not_empty"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("prompt_batches.id", ondelete="CASCADE"), index=True)
    # The last user message of `messages`, for readers that only want the question.
    text: Mapped[str] = mapped_column(Text)
    # The conversation, [{"role", "content"}, ...] ending with a user turn (app.conversations says what is
    # valid); writers that give only `text` get the one-message conversation.
    messages: Mapped[list[Any]] = mapped_column(default=_single_turn_default)
    source_user_id: Mapped[str | None] = mapped_column(String(200), index=True)
    category: Mapped[str] = mapped_column(String(16), default="plain")
    split: Mapped[str] = mapped_column(String(8), default="train")
    # Hashes of the normalised text and of its leading characters, for hygiene against earlier batches.
    normalized_key: Mapped[str] = mapped_column(String(64), index=True)
    prefix_key: Mapped[str | None] = mapped_column(String(64), index=True)
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    pii_flags: Mapped[list[Any]] = mapped_column(default=list)
    source_line: Mapped[int | None] = mapped_column(Integer)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Completion(Base):
    """A candidate output for a prompt: a model sample (with its version) or human text."""

    __tablename__ = "completions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), index=True)
    sampling: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """One unit of labeling work on a prompt, needing `needed` distinct labelers."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("kind", TASK_KINDS), name="kind"),
        CheckConstraint("kind <> 'ranking' OR (k BETWEEN 4 AND 9)", name="ranking_k"),
        CheckConstraint("needed >= 1", name="needed_positive"),
        CheckConstraint("done_count >= 0 AND done_count <= needed", name="done_count"),
        UniqueConstraint("prompt_id", "kind", name="uq_tasks_prompt_kind"),
        # The lease query walks open tasks by priority then age.
        Index("ix_tasks_open", "is_open", "priority", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("prompt_batches.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    k: Mapped[int | None] = mapped_column(Integer)
    needed: Mapped[int] = mapped_column(Integer, default=1)
    done_count: Mapped[int] = mapped_column(Integer, default=0)
    is_open: Mapped[bool] = mapped_column(Boolean, default=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # A gold task has a known answer (`GoldAnswer`); it is closed to the normal queue and served to
    # labelers who have not done it as a check, at the batch's `gold_share`.
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# The lease queue: open tasks in lease order (higher priority first, then oldest), per kind and for any
# kind, so `lease_next_task` reads them in index order and stops at the first free slot instead of
# sorting every open task. Partial, so closed tasks (most of them, once labeled) cost nothing here.
Index(
    "ix_tasks_lease_queue",
    Task.kind,
    Task.priority.desc(),
    Task.id,
    postgresql_where=text("is_open"),
    sqlite_where=text("is_open"),
)
Index(
    "ix_tasks_lease_queue_any_kind",
    Task.priority.desc(),
    Task.id,
    postgresql_where=text("is_open"),
    sqlite_where=text("is_open"),
)
# A batch's gold tasks, looked up when a lease draws a gold check.
Index("ix_tasks_gold", Task.batch_id, postgresql_where=text("is_gold"), sqlite_where=text("is_gold"))


class TaskItem(Base):
    """A completion shown in a ranking (or eval) task."""

    __tablename__ = "task_items"
    __table_args__ = (UniqueConstraint("task_id", "completion_id", name="uq_task_items_task_completion"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    completion_id: Mapped[int] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)


class Assignment(Base):
    """A labeler's lease on a task; the unit a submission is idempotent on."""

    __tablename__ = "assignments"
    __table_args__ = (
        CheckConstraint(_in("state", ASSIGNMENT_STATES), name="state"),
        UniqueConstraint("task_id", "labeler_id", name="uq_assignments_task_labeler"),
        Index("ix_assignments_labeler_state", "labeler_id", "state"),
        Index("ix_assignments_expiry", "state", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    state: Mapped[str] = mapped_column(String(16), default="leased")
    leased_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    skip_reason: Mapped[str | None] = mapped_column(String(64))
    skip_note: Mapped[str | None] = mapped_column(Text)
    draft: Mapped[dict[str, Any]] = mapped_column(default=dict)
    display_order: Mapped[list[Any]] = mapped_column(default=list)
    active_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class Demonstration(Base):
    __tablename__ = "demonstrations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    active_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Ranking(Base):
    __tablename__ = "rankings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # One submitted ranking per assignment: a repeated submit can never create a second one.
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    all_unacceptable: Mapped[bool] = mapped_column(Boolean, default=False)
    # A labeler's answer to a gold task (a quality check), scored against the task's GoldAnswer.
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    active_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    items: Mapped[list[RankingItem]] = relationship(lazy="raise", order_by="RankingItem.position")


class RankingItem(Base):
    __tablename__ = "ranking_items"
    __table_args__ = (
        UniqueConstraint("ranking_id", "completion_id", name="uq_ranking_items_ranking_completion"),
        CheckConstraint("rank BETWEEN 1 AND 9", name="rank_range"),
        CheckConstraint("likert BETWEEN 1 AND 7", name="likert_range"),
        CheckConstraint("position BETWEEN 0 AND 8", name="position_range"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ranking_id: Mapped[int] = mapped_column(ForeignKey("rankings.id", ondelete="CASCADE"), index=True)
    completion_id: Mapped[int] = mapped_column(ForeignKey("completions.id"))
    rank: Mapped[int] = mapped_column(Integer)
    likert: Mapped[int] = mapped_column(Integer)
    flags: Mapped[list[Any]] = mapped_column(default=list)
    # Where the output was shown to this labeler (0 = first), for position-bias analysis.
    position: Mapped[int] = mapped_column(Integer)


class GoldAnswer(Base):
    """The known answer of a gold task: a rank per output, copied from a trusted ranking or a consensus."""

    __tablename__ = "gold_answers"
    __table_args__ = (CheckConstraint(_in("source", GOLD_SOURCES), name="source"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), unique=True)
    # {completion_id (as a string, JSON keys are strings): dense rank}, 1 = best.
    ranks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(16))
    source_ranking_id: Mapped[int | None] = mapped_column(ForeignKey("rankings.id", ondelete="SET NULL"))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """A blind side-by-side human comparison of two model versions on held-out prompts.

    The prompts are copied into a batch of their own (`purpose = 'evaluation'`), where the worker
    samples one output per model and each prompt becomes an `eval` task showing the two outputs in a
    random order per labeler. Model A is the candidate, B the baseline; win rates are A's.
    """

    __tablename__ = "evaluations"
    __table_args__ = (
        CheckConstraint(_in("status", EVALUATION_STATUSES), name="status"),
        CheckConstraint("model_a_id <> model_b_id", name="two_models"),
        CheckConstraint("n_prompts >= 1", name="n_prompts"),
        CheckConstraint("overlap >= 1", name="overlap"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_a_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    model_b_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("prompt_batches.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="sampling")
    n_prompts: Mapped[int] = mapped_column(Integer)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    prompt_split: Mapped[str] = mapped_column(String(8), default="test")
    temperature: Mapped[float] = mapped_column(Float, default=0.0)
    max_new_tokens: Mapped[int] = mapped_column(Integer, default=48)
    # Prompts where both models wrote exactly the same text: no task, reported apart from the judgments.
    n_identical: Mapped[int] = mapped_column(Integer, default=0)
    triggered_by: Mapped[str] = mapped_column(String(32), default="admin")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]


class EvalJudgment(Base):
    """One labeler's blind verdict on one eval task: A better, B better, or a tie."""

    __tablename__ = "eval_judgments"
    __table_args__ = (
        CheckConstraint(_in("winner", ("a", "b", "tie")), name="winner"),
        CheckConstraint(_in("shown_first", ("a", "b")), name="shown_first"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    # One verdict per assignment: a repeated submit returns the stored one.
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    winner: Mapped[str] = mapped_column(String(4))
    chosen_completion_id: Mapped[int | None] = mapped_column(ForeignKey("completions.id"))  # None for a tie
    # Which model's output this labeler saw first (on the left), for position-bias checks.
    shown_first: Mapped[str] = mapped_column(String(1))
    active_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """A background job (sampling, pretraining or training) and the source of truth on its state."""

    __tablename__ = "training_runs"
    __table_args__ = (
        CheckConstraint(_in("kind", RUN_KINDS), name="kind"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        # One active training run per kind: the scheduler and admins cannot start a second.
        Index(
            "uq_training_runs_one_active",
            "kind",
            unique=True,
            postgresql_where=text(f"status IN ('queued', 'running') AND {_in('kind', TRAINING_KINDS)}"),
            sqlite_where=text(f"status IN ('queued', 'running') AND {_in('kind', TRAINING_KINDS)}"),
        ),
        # The outbox: runs committed but not yet handed to the broker.
        Index("ix_training_runs_unsent", "status", "enqueued_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("prompt_batches.id"), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    checkpoint_dir: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    triggered_by: Mapped[str] = mapped_column(String(32), default="admin")
    output_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


# --- webhooks (export API, issue 5) -----------------------------------------------------------------

WEBHOOK_EVENTS = ("batch.completed", "model_version.registered", "model_version.promoted", "training_run.failed")
DELIVERY_STATUSES = ("pending", "delivered", "failed")


class Webhook(Base):
    """A URL an admin registered to receive signed JSON events."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(200), default="")
    # The HMAC-SHA256 signing key; stored in clear because signing needs it (like Stripe's endpoint secrets).
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[Any]] = mapped_column(default=list)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook: the outbox row the worker delivers, retries and logs."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
        # The worker's query: pending deliveries whose next attempt is due.
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    # Shared by the deliveries of one event to several webhooks, so receivers can deduplicate.
    event_id: Mapped[str] = mapped_column(String(36))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
