"""Many simulated labelers at once against the real HTTP API, then the books: nothing lost, nothing doubled.

Each simulated labeler (one asyncio task with its own httpx client, only to
127.0.0.1) either logs in through the login form (session cookie + the
X-CSRF-Token header) or uses its API token of scope `label`, then loops:
`GET /api/v1/tasks/next`, "thinks" for a random time (sometimes autosaving a
draft halfway), and then submits a ranking (ordered by the bundled world's
true scorer plus noise: `app.world.SimulatedLabeler`) or a demonstration
(`SimulatedDemonstrator`), or skips the task with a reason, or abandons it
(walks away; another labeler identity takes the seat, and the lease lapses).
A request that fails in a way worth retrying (no answer, 5xx, 429) is sent
again, the same body to the same assignment, with backoff, within a bounded
time: submissions are idempotent per assignment, so a retry must never
double a label. Every loop is bounded in tasks and in time.

Each client keeps its own log of what the server acknowledged (assignment,
kind, label id). At the end the books are checked against the database:
lost (acknowledged but not stored), doubled (two labels for one assignment,
two from one labeler on a task, more labels than a task's overlap, a task
whose count disagrees with its labels, two different ids acknowledged for
one assignment), and every 5xx and dropped connection is counted. Latency
percentiles are per request kind.

By default everything runs on a private PostgreSQL cluster (initdb into a
temporary directory, dropped at the end), migrated with Alembic and seeded
with world prompts, K outputs each, ranking and demonstration tasks needing
--overlap labels each; `python -m app.cli serve --workers N` serves it.

    .venv/bin/python bench/labelers.py --clients 50 --seconds 60
    .venv/bin/python bench/labelers.py --quick     # 20 labelers, 15 s

The fault scenarios (bench/fault_*.py) reuse `Stack` and `run_labelers` from
here. The last line of stdout is one JSON object; the exit status is 1 when
the books do not balance or a 5xx was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    PrivatePostgres,
    PrivateRedis,
    create_database,
    drop_database,
    emit,
    load_avg,
    percentiles,
    start_server,
    stop_server,
    wire_loop,
)

PASSWORD = "bench-labeler-password"
SKIP_REASONS = ("unclear", "expertise", "broken_outputs", "other")
RETRYABLE = frozenset({429, 500, 502, 503, 504})


# --- the world in the database --------------------------------------------------------------------


@dataclass
class Identity:
    """One labeler account: logs in with its password, or (token set) calls the API with its token."""

    username: str
    token: str | None


@dataclass
class Seeded:
    """What `seed` put in the database."""

    batch_id: int
    identities: list[Identity]
    admin_token: str
    k: int
    overlap: int
    tasks: int
    seeded_demonstration_ids: int  # demonstrations with ids up to this one were loaded, not labeled
    seconds: float


def seed(
    url: str,
    *,
    prompts: int,
    identities: int,
    overlap: int = 2,
    k: int = 4,
    login_share: float = 0.25,
    demonstrations_done: int = 0,
    seed_value: int = 0,
) -> Seeded:
    """Loads labelers, an admin, the bundled base model, a batch in `labeling` with world prompts, K outputs
    each (the world's imperfect demonstrator, so the outputs differ in true score) and its tasks.

    `demonstrations_done`: that many prompts already carry a submitted demonstration (for training runs).
    """
    from sqlalchemy import create_engine, insert, select
    from sqlalchemy.orm import Session

    from app.collection.batches import create_tasks
    from app.models import Assignment, Completion, Demonstration, Prompt, PromptBatch, Task, User, utcnow
    from app.registry.versions import register_base_model
    from app.security import create_api_token, hash_password
    from app.world import generate_prompts
    from app.world.labelers import demonstrate

    start = time.perf_counter()
    rng = random.Random(seed_value)
    engine = create_engine(url)
    with Session(engine, expire_on_commit=False) as db:
        password_hash = hash_password(PASSWORD)  # one argon2 hash for every account: seeding stays fast
        admin = User(username="bench-admin", role="admin", password_hash=password_hash)
        users = [
            User(username=f"bench-labeler-{i}", role="labeler", password_hash=password_hash) for i in range(identities)
        ]
        db.add_all([admin, *users])
        db.flush()
        every = max(1, round(1 / login_share)) if login_share > 0 else 0  # every n-th person logs in
        people = [
            Identity(
                u.username, None if every and i % every == 0 else create_api_token(db, u, ["label"], name="bench")[0]
            )
            for i, u in enumerate(users)
        ]
        admin_token = create_api_token(db, admin, ["admin"], name="bench")[0]
        base = register_base_model(db, str(ROOT / "models" / "world-base"))
        batch = PromptBatch(
            name=f"bench-labelers-{uuid.uuid4().hex[:6]}",
            status="labeling",
            k=k,
            overlap=overlap,
            wants_demonstrations=True,
            wants_rankings=True,
            policy_version_id=base.id,
            guidelines="Rank by **correctness**, then concision. Demonstrate the answer alone.",
        )
        db.add(batch)
        db.flush()
        world = generate_prompts(prompts, seed_value, unique=False)
        now = utcnow()
        db.execute(
            insert(Prompt),
            [
                {
                    "batch_id": batch.id,
                    "text": p.text,
                    "split": "valid" if i % 10 == 9 else "train",
                    "normalized_key": hashlib.sha256(f"{i}:{p.text}".encode()).hexdigest(),
                    "created_at": now,
                }
                for i, p in enumerate(world)
            ],
        )
        prompt_rows = db.execute(
            select(Prompt.id, Prompt.text).where(Prompt.batch_id == batch.id).order_by(Prompt.id)
        ).all()
        by_text = {p.text: p for p in world}
        db.execute(
            insert(Completion),
            [
                {
                    "prompt_id": pid,
                    "text": demonstrate(by_text[text], rng, error_rate=0.5),
                    "model_version_id": base.id,
                    "sampling": {"simulated": True},
                    "created_at": now,
                }
                for pid, text in prompt_rows
                for _ in range(k)
            ],
        )
        tasks = create_tasks(db, batch)
        last_demo = 0
        if demonstrations_done:
            demo_tasks = db.execute(
                select(Task.id, Task.prompt_id, Prompt.text)
                .join(Prompt, Prompt.id == Task.prompt_id)
                .where(Task.batch_id == batch.id, Task.kind == "demonstration")
                .order_by(Task.id)
                .limit(demonstrations_done)
            ).all()
            for n, (task_id, prompt_id, text) in enumerate(demo_tasks):
                author = users[n % len(users)]
                assignment = Assignment(
                    task_id=task_id,
                    labeler_id=author.id,
                    state="submitted",
                    leased_at=now,
                    expires_at=now,
                    finished_at=now,
                    display_order=[],
                )
                db.add(assignment)
                db.flush()
                db.add(
                    Demonstration(
                        assignment_id=assignment.id,
                        task_id=task_id,
                        prompt_id=prompt_id,
                        labeler_id=author.id,
                        text=demonstrate(by_text[text], rng, error_rate=0.2),
                    )
                )
                task = db.get(Task, task_id)
                task.done_count += 1
                task.is_open = task.done_count < task.needed
            db.flush()
            last_demo = db.scalar(select(Demonstration.id).order_by(Demonstration.id.desc()).limit(1)) or 0
        db.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return Seeded(
        batch_id=batch.id,
        identities=people,
        admin_token=admin_token,
        k=k,
        overlap=overlap,
        tasks=tasks,
        seeded_demonstration_ids=last_demo,
        seconds=round(time.perf_counter() - start, 2),
    )


# --- the simulated labelers -----------------------------------------------------------------------


@dataclass
class Behaviour:
    """How the simulated labelers act; every loop is bounded by `max_tasks` and the run's deadline."""

    wire_loop()

    think_s: tuple[float, float] = (0.5, 4.0)
    p_skip: float = 0.05
    p_abandon: float = 0.03
    p_draft: float = 0.2
    max_tasks: int = 10_000
    retry_for_s: float = 60.0  # how long one request is retried before the client gives up on it
    noise: float = 0.244  # the world's labeler noise (73 % agreement between two labelers)


@dataclass
class Ack:
    """Something the server acknowledged with a 200: a label (its id) or a skip."""

    username: str
    assignment_id: int
    kind: str  # ranking | demonstration | skip
    label_id: int | None


@dataclass
class ClientLog:
    """One simulated labeler's own record of the run."""

    seat: int
    acks: list[Ack] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)
    conflicts: list[tuple[int, int, str]] = field(default_factory=list)  # (assignment, status, detail)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)  # "op status" -> count
    transport: Counter = field(default_factory=Counter)  # "op ExceptionName" -> count
    failures: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, "op what")
    answered_at: list[float] = field(default_factory=list)  # monotonic times of answers that needed no retry
    retries: int = 0
    requests_given_up: int = 0
    gave_up: list[str] = field(default_factory=list)  # why this seat stopped early
    crashes: list[str] = field(default_factory=list)
    exhausted: bool = False
    identities_used: int = 0


class Refused(Exception):
    """The run is over (deadline) or a request could not get through within its retry window."""


class Labeler:
    """One seat at which simulated labelers work, one identity after another."""

    def __init__(
        self,
        base: str,
        seat: int,
        pool: list[Identity],
        behaviour: Behaviour,
        deadline: float,
        hard_deadline: float,
        log: ClientLog,
    ):
        from app.world.labelers import SimulatedDemonstrator, SimulatedLabeler

        host = urlsplit(base).hostname
        if host != "127.0.0.1":
            raise ValueError(f"base: the simulated labelers only target 127.0.0.1, not {host!r}")
        self.base, self.seat, self.pool, self.b = base, seat, pool, behaviour
        self.deadline, self.hard_deadline, self.log = deadline, hard_deadline, log
        self.rng = random.Random(seat)
        self.ranker = SimulatedLabeler(behaviour.noise, seed=seat)
        self.demonstrator = SimulatedDemonstrator(error_rate=0.2, seed=seat)
        self.client = None
        self.identity: Identity | None = None

    # -- requests --

    async def call(self, op: str, method: str, path: str, **kwargs):
        """Sends a request, retrying what is worth retrying (no answer, 5xx, 429) with backoff.

        Returns the last response (None when none came); gives up after `retry_for_s` or at the hard deadline.
        """
        import httpx

        give_up_at = min(time.monotonic() + self.b.retry_for_s, self.hard_deadline)
        delay = 0.1
        while True:
            t0 = time.perf_counter()
            response = None
            try:
                response = await self.client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                self.log.transport[f"{op} {type(exc).__name__}"] += 1
                self.log.failures.append((time.monotonic(), f"{op} {type(exc).__name__}"))
            else:
                self.log.latency_ms.setdefault(op, []).append((time.perf_counter() - t0) * 1000)
                self.log.statuses[f"{op} {response.status_code}"] += 1
                if response.status_code not in RETRYABLE:
                    self.log.answered_at.append(time.monotonic())
                    return response
                self.log.failures.append((time.monotonic(), f"{op} {response.status_code}"))
            if time.monotonic() + delay > give_up_at:
                self.log.requests_given_up += 1
                return response
            self.log.retries += 1
            retry_after = response is not None and response.headers.get("retry-after", "")
            await asyncio.sleep(float(retry_after) if retry_after and retry_after.isdigit() else delay)
            delay = min(2.0, delay * 2)

    async def sign_in(self) -> bool:
        """Takes the next identity: a bearer token, or a login through the form. False when none is left."""
        import httpx

        if not self.pool:
            return False
        self.identity = self.pool.pop()
        self.log.identities_used += 1
        if self.client is not None:
            await self.client.aclose()
        headers = {"Authorization": f"Bearer {self.identity.token}"} if self.identity.token else {}
        self.client = httpx.AsyncClient(
            base_url=self.base,
            headers=headers,
            timeout=30.0,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
        )
        if self.identity.token:
            return True
        form = await self.call("login", "GET", "/login")
        token = _csrf(form)
        done = await self.call(
            "login",
            "POST",
            "/login",
            data={"username": self.identity.username, "password": PASSWORD, "csrf_token": token or ""},
        )
        if done is None or done.status_code != 303:
            raise Refused(f"login of {self.identity.username}: {_status(done)}")
        page = await self.call("login", "GET", done.headers["location"])
        csrf = _csrf(page)
        if csrf is None:
            raise Refused(f"no CSRF token on {done.headers['location']} after login: {_status(page)}")
        self.client.headers["X-CSRF-Token"] = csrf
        return True

    # -- the loop --

    async def run(self) -> None:
        try:
            if not await self.sign_in():
                return
            for _ in range(self.b.max_tasks):
                if time.monotonic() >= self.deadline:
                    return
                lease = await self.call("lease", "GET", "/api/v1/tasks/next")
                if lease is None or lease.status_code in RETRYABLE:
                    raise Refused(f"lease: {_status(lease)}")
                if lease.status_code == 204:
                    self.log.exhausted = True
                    return
                if lease.status_code != 200:
                    self.log.conflicts.append((0, lease.status_code, lease.text[:200]))
                    continue
                await self.work_on(lease.json())
        except Refused as exc:
            self.log.gave_up.append(str(exc))
        finally:
            if self.client is not None:
                await self.client.aclose()

    async def work_on(self, task: dict[str, Any]) -> None:
        assignment = task["assignment_id"]
        think = min(self.rng.uniform(*self.b.think_s), max(0.0, self.deadline - time.monotonic()))
        if self.rng.random() < self.b.p_draft:
            await asyncio.sleep(think / 2)
            await self.call(
                "draft",
                "PUT",
                f"/api/v1/assignments/{assignment}/draft",
                json={"draft": {"note": "halfway"}, "active_seconds": think / 2},
            )
            await asyncio.sleep(think / 2)
        else:
            await asyncio.sleep(think)
        roll = self.rng.random()
        if roll < self.b.p_abandon and self.pool:
            # Walks away with the lease held; a new person sits down. The lease lapses on its own.
            self.log.abandoned.append(assignment)
            await self.sign_in()
            return
        if roll < self.b.p_abandon + self.b.p_skip:
            reason = self.rng.choice(SKIP_REASONS)
            body = {"reason": reason, "note": "the outputs look truncated" if reason == "other" else ""}
            response = await self.call("skip", "POST", f"/api/v1/assignments/{assignment}/skip", json=body)
            self.record(task, response, "skip")
            return
        if task["kind"] == "ranking":
            texts = [c["text"] for c in task["completions"]]
            ranks = self.ranker.rank(task["prompt"], texts)
            likerts = self.ranker.likert(task["prompt"], texts)
            body = {
                "items": [
                    {"completion_id": c["id"], "rank": r, "likert": lk, "flags": []}
                    for c, r, lk in zip(task["completions"], ranks, likerts, strict=True)
                ],
                "active_seconds": think,
            }
        else:
            body = {"text": self.demonstrator.demonstrate(task["prompt"]), "active_seconds": think}
        response = await self.call("submit", "POST", f"/api/v1/assignments/{assignment}/submit", json=body)
        self.record(task, response, task["kind"])

    def record(self, task: dict[str, Any], response, kind: str) -> None:
        if response is None or response.status_code in RETRYABLE:
            raise Refused(f"{kind} of assignment {task['assignment_id']}: {_status(response)}")
        if response.status_code != 200:
            self.log.conflicts.append((task["assignment_id"], response.status_code, response.text[:200]))
            return
        data = response.json()
        self.log.acks.append(
            Ack(
                self.identity.username,
                task["assignment_id"],
                kind,
                None if kind == "skip" else data["id"],
            )
        )


def _csrf(response) -> str | None:
    if response is None:
        return None
    found = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
    return found.group(1) if found else None


def _status(response) -> str:
    return "no answer" if response is None else f"HTTP {response.status_code}"


async def run_labelers(
    base: str,
    identities: list[Identity],
    clients: int,
    seconds: float,
    behaviour: Behaviour,
    during: Callable[[], Awaitable[dict]] | None = None,
) -> tuple[list[ClientLog], dict]:
    """Runs `clients` simulated labelers for `seconds` (plus their retry window); `during` runs beside them.

    Identities are shared out seat by seat; a labeler who abandons a task hands the seat to a fresh identity.
    Returns the clients' logs and what `during` returned.
    """
    if clients > len(identities):
        raise ValueError(f"clients: {clients} labelers need at least as many identities ({len(identities)})")
    pool = list(reversed(identities))
    start = time.monotonic()
    deadline = start + seconds
    hard_deadline = deadline + behaviour.retry_for_s
    logs = [ClientLog(seat) for seat in range(clients)]
    labelers = [Labeler(base, seat, pool, behaviour, deadline, hard_deadline, logs[seat]) for seat in range(clients)]

    async def staggered(labeler: Labeler) -> None:
        # People do not all arrive in the same millisecond: spread the first logins over a second or two.
        await asyncio.sleep(labeler.seat * min(2.0, seconds / 10) / max(1, clients))
        try:
            await labeler.run()
        except Exception as exc:  # a client bug or an answer it cannot read: counted, and fails the run
            labeler.log.crashes.append(f"{type(exc).__name__}: {exc}"[:300])

    outcome: dict = {}
    loads: list[float] = []

    async def side() -> None:
        if during is not None:
            outcome.update(await during())

    async def sample_load() -> None:
        while time.monotonic() < deadline:
            loads.append(load_avg())
            await asyncio.sleep(min(10.0, max(1.0, seconds / 10)))

    await asyncio.gather(side(), sample_load(), *(staggered(lab) for lab in labelers))
    loads.append(load_avg())
    return logs, outcome | {
        "wall_s": round(time.monotonic() - start, 2),
        "load_avg_1m": {"min": min(loads), "mean": round(sum(loads) / len(loads), 2), "max": max(loads)},
    }


def run_load(
    stack: Stack,
    clients: int,
    seconds: float,
    behaviour: Behaviour,
    during: Callable[[], Awaitable[dict]] | None = None,
) -> tuple[dict[str, Any], list[ClientLog]]:
    """Drives the labelers against a stack (with `during` beside them); returns the figures and books, and the logs."""
    logs, outcome = asyncio.run(run_labelers(stack.base, stack.seeded.identities, clients, seconds, behaviour, during))
    figures = summarize(logs, seconds)
    books = stack.books(logs)
    return {
        "clients": clients,
        "seconds": seconds,
        "workers": stack.workers,
        **outcome,
        **figures,
        "books": books,
    }, logs


# --- figures and books ----------------------------------------------------------------------------


def summarize(logs: list[ClientLog], seconds: float) -> dict[str, Any]:
    """Requests, statuses, 5xx, dropped connections, retries and latency percentiles (ms) per request kind."""
    statuses: Counter = Counter()
    transport: Counter = Counter()
    latency: dict[str, list[float]] = {}
    for log in logs:
        statuses.update(log.statuses)
        transport.update(log.transport)
        for op, values in log.latency_ms.items():
            latency.setdefault(op, []).extend(values)
    everything = [v for values in latency.values() for v in values]
    acks = [a for log in logs for a in log.acks]
    server_errors = {k: v for k, v in statuses.items() if int(k.split()[1]) >= 500}
    return {
        "requests": sum(statuses.values()) + sum(transport.values()),
        "answered": sum(statuses.values()),
        "status_counts": dict(sorted(statuses.items())),
        "5xx": sum(server_errors.values()),
        "5xx_by_kind": server_errors,
        "500": sum(v for k, v in server_errors.items() if k.endswith(" 500")),
        "no_answer": sum(transport.values()),
        "no_answer_by_kind": dict(transport),
        "retries": sum(log.retries for log in logs),
        # Seats that stopped early (a request unanswered within its retry window) or crashed: a failure.
        "gave_up": sum(1 for log in logs if log.gave_up or log.crashes),
        "requests_given_up": sum(log.requests_given_up for log in logs),
        "gave_up_examples": [g for log in logs for g in log.gave_up + log.crashes][:5],
        "acknowledged": dict(Counter(a.kind for a in acks)),
        "labels_per_s": round(sum(1 for a in acks if a.kind != "skip") / max(seconds, 1e-9), 2),
        "abandoned": sum(len(log.abandoned) for log in logs),
        "conflicts_409": sum(1 for log in logs for c in log.conflicts if c[1] == 409),
        "other_4xx": [c for log in logs for c in log.conflicts if c[1] != 409][:5],
        "clients_out_of_tasks": sum(log.exhausted for log in logs),
        "identities_used": sum(log.identities_used for log in logs),
        "latency_ms": {op: percentiles(values) for op, values in sorted(latency.items())}
        | {"all": percentiles(everything)},
    }


def failure_window(logs: list[ClientLog], since: float) -> dict[str, Any]:
    """When clients saw failures (no answer, 5xx, 429) after `since` (monotonic): first, last, count."""
    times = sorted(t for log in logs for t, _ in log.failures if t >= since)
    if not times:
        return {"failures": 0, "first_s": None, "last_s": None}
    return {"failures": len(times), "first_s": round(times[0] - since, 2), "last_s": round(times[-1] - since, 2)}


def check_books(url: str, logs: list[ClientLog], seeded: Seeded) -> dict[str, Any]:
    """Checks the database against what the clients were told: zero lost, zero doubled."""
    from sqlalchemy import create_engine

    acks = [a for log in logs for a in log.acks]
    by_assignment: dict[int, set[tuple[str, int | None]]] = {}
    for ack in acks:
        by_assignment.setdefault(ack.assignment_id, set()).add((ack.kind, ack.label_id))
    # Acknowledged twice with different answers (two label ids, or a label and a skip) for one assignment.
    contradicting = [a for a, answers in by_assignment.items() if len(answers) > 1]
    engine = create_engine(url)
    with engine.connect() as conn:
        q = conn.exec_driver_sql
        labels = {
            (kind, label_id): assignment
            for kind, label_id, assignment in q(
                "SELECT 'ranking', id, assignment_id FROM rankings UNION ALL "
                "SELECT 'demonstration', id, assignment_id FROM demonstrations"
            )
        }
        states = dict(q("SELECT id, state FROM assignments").all())
        checks = {
            "assignments_with_two_labels": q(
                "SELECT count(*) FROM (SELECT assignment_id FROM (SELECT assignment_id FROM rankings UNION ALL "
                "SELECT assignment_id FROM demonstrations) l GROUP BY assignment_id HAVING count(*) > 1) d"
            ).scalar(),
            "labeler_labeled_a_task_twice": q(
                "SELECT count(*) FROM (SELECT task_id, labeler_id FROM (SELECT task_id, labeler_id FROM rankings "
                "UNION ALL SELECT task_id, labeler_id FROM demonstrations) l GROUP BY task_id, labeler_id "
                "HAVING count(*) > 1) d"
            ).scalar(),
            "tasks_over_overlap": q(
                "SELECT count(*) FROM tasks t WHERE t.needed < (SELECT count(*) FROM rankings r WHERE r.task_id = t.id)"
                " + (SELECT count(*) FROM demonstrations d WHERE d.task_id = t.id)"
            ).scalar(),
            "tasks_whose_count_disagrees": q(
                "SELECT count(*) FROM tasks t WHERE t.done_count <> (SELECT count(*) FROM rankings r "
                "WHERE r.task_id = t.id) + (SELECT count(*) FROM demonstrations d WHERE d.task_id = t.id)"
            ).scalar(),
            "rankings_without_k_items": q(
                "SELECT count(*) FROM rankings r JOIN tasks t ON t.id = r.task_id WHERE t.k <> "
                "(SELECT count(*) FROM ranking_items i WHERE i.ranking_id = r.id)"
            ).scalar(),
        }
    engine.dispose()
    lost = []
    for ack in acks:
        if ack.kind == "skip":
            if states.get(ack.assignment_id) != "skipped":
                lost.append(ack)
        elif labels.get((ack.kind, ack.label_id)) != ack.assignment_id or states.get(ack.assignment_id) != "submitted":
            lost.append(ack)
    acked_labels = {(a.kind, a.label_id) for a in acks if a.kind != "skip"}
    unacknowledged = [
        key
        for key in labels
        if key not in acked_labels and not (key[0] == "demonstration" and key[1] <= seeded.seeded_demonstration_ids)
    ]
    abandoned = [a for log in logs for a in log.abandoned]
    books = {
        "acknowledged": len(acks),
        "labels_stored_in_run": len([k for k in labels if k in acked_labels]) + len(unacknowledged),
        "lost": len(lost),
        "lost_examples": [vars(a) for a in lost[:5]],
        "contradicting_acks": len(contradicting),
        **checks,
        # Stored although no client heard the answer (it gave up retrying): not lost, and not doubled.
        "stored_unacknowledged": len(unacknowledged),
        "abandoned_still_leased_or_expired": sum(1 for a in abandoned if states.get(a) in ("leased", "expired")),
    }
    books["doubled"] = (
        len(contradicting)
        + checks["assignments_with_two_labels"]
        + checks["labeler_labeled_a_task_twice"]
        + checks["tasks_over_overlap"]
    )
    books["ok"] = books["lost"] == 0 and books["doubled"] == 0 and not any(checks.values())
    return books


# --- the stack a scenario runs against ------------------------------------------------------------


class Stack:
    """A private PostgreSQL (and Redis when asked), a migrated and seeded database, and the web server.

    Used as a context manager; everything is stopped and deleted on exit (the temporary directory with
    the server, worker and database logs is kept when `keep` is set, and named on stderr).
    """

    def __init__(
        self,
        *,
        workers: int,
        prompts: int,
        identities: int,
        overlap: int = 2,
        k: int = 4,
        redis: bool = False,
        demonstrations_done: int = 0,
        pg_admin_url: str | None = None,
        max_connections: int = 400,
        keep: bool = False,
        server_env: dict[str, str] | None = None,
    ):
        self.workers, self.prompts, self.identities, self.overlap, self.k = workers, prompts, identities, overlap, k
        self.want_redis, self.demonstrations_done = redis, demonstrations_done
        self.pg_admin_url, self.max_connections, self.keep = pg_admin_url, max_connections, keep
        self.server_env = server_env or {}
        self.dir = Path(tempfile.mkdtemp(prefix="instructloop-faults-"))
        self.pg: PrivatePostgres | None = None
        self.redis: PrivateRedis | None = None
        self.server = None
        self.db_name = f"instructloop_bench_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        if self.pg_admin_url is None:
            self.pg = PrivatePostgres(max_connections=self.max_connections).start()
            self.admin_url = self.pg.admin_url
        else:
            self.admin_url = self.pg_admin_url
        if self.want_redis:
            self.redis = PrivateRedis(self.dir / "redis.log").start()
        self.url = create_database(self.admin_url, self.db_name)
        self.env = {
            "INSTRUCTLOOP_DATABASE_URL": self.url,
            "INSTRUCTLOOP_DATA_DIR": str(self.dir / "data"),
            "INSTRUCTLOOP_ENVIRONMENT": "local",
            # Abandoned tasks come back to the pool within the run.
            "INSTRUCTLOOP_LEASE_MINUTES": "1",
        }
        # The private Redis when there is one, else the filesystem broker in the data dir: never a shared Redis.
        self.env["INSTRUCTLOOP_BROKER_URL"] = self.redis.url if self.redis is not None else ""
        os.environ.update(self.env)  # this process reads the same settings (seeding, Celery sender)
        from app.config import get_settings

        get_settings.cache_clear()
        self.seeded = seed(
            self.url,
            prompts=self.prompts,
            identities=self.identities,
            overlap=self.overlap,
            k=self.k,
            demonstrations_done=self.demonstrations_done,
        )
        print(
            f"seeded {self.seeded.tasks:,} tasks ({self.prompts:,} prompts, overlap {self.overlap}, K {self.k}) "
            f"and {self.identities} labelers in {self.seeded.seconds} s",
            file=sys.stderr,
        )
        self.start_web()

    def start_web(self) -> None:
        self.server, self.base = start_server(
            self.url, self.workers, self.dir / "data", self.dir / "server.log", env=self.env | self.server_env
        )

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            stop_server(self.server)
        if self.redis is not None:
            self.redis.close()
        try:
            if self.pg is None or self.pg.running():
                drop_database(self.admin_url, self.db_name)
        except Exception as error:  # cleanup must not hide the scenario's own outcome
            print(f"could not drop {self.db_name}: {error}", file=sys.stderr)
        if self.pg is not None:
            self.pg.close()
        if self.keep:
            print(f"logs kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def books(self, logs: list[ClientLog]) -> dict[str, Any]:
        return check_books(self.url, logs, self.seeded)


def sizing(clients: int, seconds: float, behaviour: Behaviour, overlap: int) -> tuple[int, int]:
    """Prompts and identities enough that the labelers do not run out within the run (at most 40 labels/s)."""
    mean_think = sum(behaviour.think_s) / 2
    labels = min(40.0, clients / max(0.3, mean_think)) * seconds * 1.3
    prompts = max(200, int(labels / (2 * overlap)) + clients)
    identities = clients + int(clients * behaviour.p_abandon * seconds / max(0.3, mean_think) * 1.5) + 10
    return prompts, identities


def load_parser(doc: str, *, clients: int, seconds: float, workers: int) -> argparse.ArgumentParser:
    """A command line for a load-driving script: its docstring as help, and the options they all share."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=clients, help="simulated labelers at once")
    parser.add_argument("--seconds", type=float, default=seconds, help="how long the labelers work")
    parser.add_argument("--workers", type=int, default=workers, help="uvicorn worker processes")
    parser.add_argument("--think", default="0.5,4", help="think time range in seconds, 'low,high'")
    parser.add_argument("--overlap", type=int, default=2, help="labels each task needs")
    parser.add_argument(
        "--pg-admin-url",
        default=None,
        help="use this PostgreSQL (a URL allowed to create databases) instead of a private cluster",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with the logs")
    return parser


def behaviour_from(args: argparse.Namespace) -> Behaviour:
    low, high = (float(x) for x in args.think.split(","))
    return Behaviour(think_s=(low, high))


def main() -> int:
    parser = load_parser(__doc__, clients=50, seconds=60.0, workers=2)
    parser.add_argument("--quick", action="store_true", help="20 labelers for 15 s")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds = 20, 15.0
    behaviour = behaviour_from(args)
    prompts, identities = sizing(args.clients, args.seconds, behaviour, args.overlap)
    with Stack(
        workers=args.workers,
        prompts=prompts,
        identities=identities,
        overlap=args.overlap,
        pg_admin_url=args.pg_admin_url,
        keep=args.keep,
    ) as stack:
        result, _ = run_load(stack, args.clients, args.seconds, behaviour)
    summary = {"benchmark": "labelers", **result}
    summary["ok"] = result["books"]["ok"] and result["5xx"] == 0
    return emit(summary)


if __name__ == "__main__":
    sys.exit(main())
