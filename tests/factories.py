"""factory_boy factories for test data; `bind_factories(session)` points them at a test's session."""

from __future__ import annotations

import factory
from factory.alchemy import SQLAlchemyModelFactory

from app import models
from app.security import hash_password

PASSWORD = "correct horse battery"
_PASSWORD_HASH = hash_password(PASSWORD)  # argon2 is slow on purpose; hash once per run


class _Base(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_persistence = "flush"


class UserFactory(_Base):
    class Meta:
        model = models.User

    username = factory.Sequence(lambda n: f"user{n}")
    role = "labeler"
    password_hash = _PASSWORD_HASH


class AdminFactory(UserFactory):
    role = "admin"
    username = factory.Sequence(lambda n: f"admin{n}")


class ModelVersionFactory(_Base):
    class Meta:
        model = models.ModelVersion

    name = factory.Sequence(lambda n: f"model-{n}")
    kind = "base"
    status = "ready"
    artifact_path = "/nonexistent"


class BatchFactory(_Base):
    class Meta:
        model = models.PromptBatch

    name = factory.Sequence(lambda n: f"batch-{n}")
    guidelines = "Rank by correctness."
    k = 4


class PromptFactory(_Base):
    class Meta:
        model = models.Prompt

    batch = factory.SubFactory(BatchFactory)
    batch_id = factory.SelfAttribute("batch.id")
    text = factory.Sequence(lambda n: f"What is {n} + 1?")
    normalized_key = factory.Sequence(lambda n: f"{n:064x}")
    source_user_id = factory.Sequence(lambda n: f"src-{n % 7}")

    class Params:
        batch = None

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        kwargs.pop("batch", None)
        return super()._create(model_class, *args, **kwargs)


class CompletionFactory(_Base):
    class Meta:
        model = models.Completion

    text = factory.Sequence(lambda n: f"answer {n}")


ALL = [UserFactory, AdminFactory, ModelVersionFactory, BatchFactory, PromptFactory, CompletionFactory]


def bind_factories(session) -> None:
    for f in ALL:
        f._meta.sqlalchemy_session = session
