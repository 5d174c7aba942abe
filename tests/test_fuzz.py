"""Hostile input on the JSON API: schemathesis fuzzes every operation of the OpenAPI schema.

Every operation under /api/v1 gets generated requests, valid and invalid
(schemathesis' examples, coverage and fuzzing phases), sent in-process to
the ASGI app as an admin whose token holds every scope, and again as a
labeler. No answer may be a 5xx, and every answer must match the schema
the app publishes (body and content type). The requests run on the
migrated PostgreSQL test database inside the test's transaction, which is
rolled back afterwards, so nothing they create is seen by other tests.
Ids in paths and bodies are aimed at rows that exist half of the time
(batches with tasks, the caller's leased assignments and someone else's,
models, runs, a webhook, a spare token), so the fuzz reaches the services
and not only the 404s. A second test sends the hostile values a generator
rarely combines with a real row (ids beyond 64 bits, NUL characters, lone
surrogates, nulls for settings).

CI runs 20 examples per operation (about 4,500 requests). For the long
local run set INSTRUCTLOOP_FUZZ_EXAMPLES, e.g.

    INSTRUCTLOOP_FUZZ_EXAMPLES=100 .venv/bin/python -m pytest tests/test_fuzz.py -q -s -p no:cacheprovider

which prints how many requests it sent and the statuses they got.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from app.deps import get_db
from app.labeling import leases
from app.main import create_app
from app.models import Assignment, ModelVersion, TrainingRun, Webhook
from app.security import create_api_token
from tests.factories import AdminFactory, UserFactory
from tests.test_labeling import seed_batch

EXAMPLES = int(os.environ.get("INSTRUCTLOOP_FUZZ_EXAMPLES", "20"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
ALL_SCOPES = ["admin", "export:read", "label"]

pytestmark = pytest.mark.slow

APP = create_app()
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)
SENT: Counter = Counter()  # (role, status) -> requests, over the whole module


@dataclass
class Caller:
    """Who the fuzz requests come from, and the ids of rows worth aiming at."""

    role: str
    headers: dict[str, str]
    own_token_id: int
    ids: dict[str, list[int]]


_current: dict[str, Caller] = {}  # the caller of the running test, for the generation hooks


# --- data and app ---------------------------------------------------------------------------------


def _seed(db, user, other) -> dict[str, list[int]]:
    """Creates rows the fuzz can hit: batches with ranking and demonstration tasks, leases, models, runs, webhooks."""
    ranking = seed_batch(db, n_prompts=3, k=4, rankings=True, guidelines="**Rank** by correctness.")
    demos = seed_batch(db, n_prompts=2, rankings=False, demonstrations=True)
    draft = seed_batch(db, n_prompts=1)
    draft.status, draft.allow_prompt_writing = "draft", True
    leased = [leases.lease_next_task(db, user, kind) for kind in ("ranking", "demonstration")]
    foreign = leases.lease_next_task(db, other, "ranking")  # someone else's: must stay out of reach
    runs = [
        TrainingRun(kind="sft", status="succeeded", progress=1.0, metrics={"curve": [{"step": 1, "loss": 1.0}]}),
        TrainingRun(kind="rm", status="queued"),
    ]
    hook = Webhook(url="http://127.0.0.1:9/hook", secret="s" * 32, events=["batch.completed"])
    db.add_all([*runs, hook])
    _, spare = create_api_token(db, user, ["label"], "spare")
    db.flush()
    return {
        "batch_id": [ranking.id, demos.id, draft.id],
        "assignment_id": [a.id for a in (*leased, foreign) if isinstance(a, Assignment)],
        "version_id": [m.id for m in db.query(ModelVersion).all()],
        "policy_version_id": [m.id for m in db.query(ModelVersion).all()],
        "run_id": [r.id for r in runs],
        "webhook_id": [hook.id],
        "token_id": [spare.id],
    }


def _bind(db, role: str) -> Iterator[Caller]:
    """Seeds the database, points the app at the test's session and yields the caller."""
    user = AdminFactory() if role == "admin" else UserFactory()
    raw, token = create_api_token(db, user, ALL_SCOPES if role == "admin" else ["label"], "fuzz")
    caller = Caller(role, {"authorization": f"Bearer {raw}"}, token.id, _seed(db, user, UserFactory()))

    def override():
        db.commit()  # releases the test's savepoint only; the outer transaction is rolled back at the end
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise

    APP.dependency_overrides[get_db] = override
    _current["caller"] = caller
    yield caller
    _current.clear()
    APP.dependency_overrides.clear()


@pytest.fixture
def admin_caller(db) -> Iterator[Caller]:
    yield from _bind(db, "admin")


@pytest.fixture
def labeler_caller(db) -> Iterator[Caller]:
    yield from _bind(db, "labeler")


@pytest.fixture(scope="module", autouse=True)
def _report_totals() -> Iterator[None]:
    yield
    if SENT:
        by_role, by_status = Counter(), Counter()
        for (role, status), n in SENT.items():
            by_role[role] += n
            by_status[status] += n
        print(  # noqa: T201 - the run's totals, shown with -s; a report, not a check
            f"\nfuzz: {sum(SENT.values())} requests {dict(by_role)}, {EXAMPLES} examples per operation; "
            f"statuses {dict(sorted(by_status.items()))}"
        )


# --- generation ---------------------------------------------------------------------------------


def _aimed(values: dict[str, Any]):
    """Half of the time, replaces the ids in `values` with ids of seeded rows."""
    caller = _current.get("caller")
    if not isinstance(values, dict) or caller is None or not any(caller.ids.get(k) for k in values):
        return st.just(values)
    aimed = {
        name: st.sampled_from(caller.ids[name]) if caller.ids.get(name) else st.just(value)
        for name, value in values.items()
    }
    return st.one_of(st.just(values), st.fixed_dictionaries(aimed))


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    return _aimed(path_parameters)


@schema.hook
def flatmap_body(context, body):
    return _aimed(body)


@schema.hook
def filter_path_parameters(context, path_parameters):
    """Spares the caller's own token: revoking it would turn the rest of the run into 401s."""
    caller = _current.get("caller")
    return caller is None or not path_parameters or path_parameters.get("token_id") != caller.own_token_id


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=EXAMPLES <= 20,
    suppress_health_check=list(HealthCheck),
)


# --- known 500s in modules of other sessions --------------------------------------------------------

# 500s this fuzz found (and that are fixed): each must stay a 4xx.
FOUND_500S = [
    ("GET", "/api/v1/export/rankings", {"min_overlap": 2**31}, None),  # no maximum: PostgreSQL integer overflow
    ("GET", "/api/v1/export/rankings", {"batch": "\x00"}, None),  # NUL: PostgreSQL text cannot hold it
    ("GET", "/api/v1/export/comparisons", {"model_version": "a\x00b"}, None),
    ("GET", "/api/v1/export/rankings", {"batch": "9" * 20}, None),  # all digits: an id beyond 64 bits
    ("GET", "/api/v1/export/demonstrations", {"batch": "\u00b2"}, None),  # '²' passes isdigit(), not int()
    ("POST", "/api/v1/prompts/written", None, {"batch_id": 2**64, "text": "hi"}),  # unbounded id
    ("POST", "/api/v1/webhooks", None, {"url": "http://\x00/", "events": ["batch.completed"]}),  # NUL in url
]


@pytest.mark.parametrize(("method", "path", "query", "body"), FOUND_500S, ids=lambda value: None)
def test_found_500s_stay_fixed(app, db, method, path, query, body):
    raw, _ = create_api_token(db, AdminFactory(), ALL_SCOPES)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.request(method, path, params=query, json=body, headers={"authorization": f"Bearer {raw}"})
    assert response.status_code < 500


# --- the fuzz -----------------------------------------------------------------------------------


def _call(case, caller: Caller) -> None:
    response = case.call(headers=caller.headers)
    SENT[caller.role, response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_fuzz_as_admin(case, admin_caller):
    _call(case, admin_caller)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_fuzz_as_labeler(case, labeler_caller):
    _call(case, labeler_caller)


# --- hostile values the generator rarely aims at a real row -------------------------------------

BIG = 2**64


def _probes(ids: dict[str, list[int]]) -> list[tuple[str, str, Any]]:
    batch, draft = ids["batch_id"][0], ids["batch_id"][2]
    ranking, demonstration = ids["assignment_id"][0], ids["assignment_id"][1]
    return [
        ("GET", f"/api/v1/batches/{BIG}", None),
        ("DELETE", f"/api/v1/tokens/{-BIG}", None),
        ("GET", f"/api/v1/runs/{BIG}", None),
        ("PATCH", f"/api/v1/batches/{draft}", {"policy_version_id": 2**62}),
        ("PATCH", f"/api/v1/batches/{draft}", {"policy_version_id": BIG}),
        ("PATCH", f"/api/v1/batches/{draft}", {"name": "a\x00b", "guidelines": "\x00"}),
        ("PATCH", f"/api/v1/batches/{draft}", {"guidelines": "\udfff"}),
        ("POST", "/api/v1/batches", {"name": "\x00"}),
        ("POST", "/api/v1/batches", {"name": "x", "guidelines": "\ud800"}),
        ("POST", "/api/v1/batches", {"name": "fine", "policy_version_id": 2**62}),
        ("POST", "/api/v1/batches", {"name": "n", "policy_version_id": BIG}),
        ("POST", "/api/v1/prompts/written", {"batch_id": batch, "text": "\x00"}),
        ("POST", "/api/v1/prompts/written", {"batch_id": batch, "text": "\ud800"}),
        (
            "POST",
            f"/api/v1/assignments/{ranking}/submit",
            {"items": [{"completion_id": BIG, "rank": BIG, "likert": -BIG}], "text": "\x00"},
        ),
        ("POST", f"/api/v1/assignments/{demonstration}/submit", {"text": "\ud800"}),
        ("POST", f"/api/v1/assignments/{ranking}/skip", {"reason": "other", "note": "\x00"}),
        ("POST", f"/api/v1/assignments/{ranking}/skip", {"reason": "other", "note": "\ud800"}),
        ("PUT", f"/api/v1/assignments/{ranking}/draft", {"draft": {"text": "\x00", "\x00": [BIG]}}),
        ("PUT", f"/api/v1/assignments/{ranking}/draft", {"draft": {"text": "\ud800"}}),
        ("POST", "/api/v1/runs", {"kind": "sft", "params": {"\x00": 1, "seed": "\ud800"}}),
        ("POST", "/api/v1/webhooks", {"url": "http://x/", "events": ["batch.completed"], "description": "\ud800"}),
        ("GET", "/api/v1/export/rankings?labeler=%00&split=%ED%A0%80", None),
        ("GET", "/api/v1/tasks/next?kind=%00", None),
    ]


def test_hostile_values_on_real_rows_are_4xx(admin_caller):
    failures = []
    with TestClient(APP, raise_server_exceptions=False) as client:
        draft = admin_caller.ids["batch_id"][2]
        nulls = client.patch(
            f"/api/v1/batches/{draft}",
            json={"allow_prompt_writing": None, "k": None, "name": None},
            headers=admin_caller.headers,
        )
        assert nulls.status_code == 200 and nulls.json()["allow_prompt_writing"] is True  # null leaves it be
        for method, url, body in _probes(admin_caller.ids):
            # json.dumps escapes a lone surrogate as \udxxx, as a hostile client would send it.
            response = client.request(
                method,
                url,
                content=None if body is None else json.dumps(body),
                headers={**admin_caller.headers, "content-type": "application/json"},
            )
            if response.status_code >= 500 or response.status_code < 400:
                failures.append(f"{method} {url} {body!r}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
