"""Benchmark: importing a prompt batch into PostgreSQL with the full InstructGPT hygiene.

Generates N prompts (default 100,000) with exact duplicates (case and
whitespace variants), prompts sharing a long prefix, PII (emails, phones,
Luhn-valid card numbers) and heavy users over the per-user cap mixed in, then
imports them through `app.collection.batches.import_prompts` (parse, validate,
hygiene, split, insert, commit) into a dedicated, freshly migrated database.
It runs the import twice, each in a fresh process so peak memory is its own:
once into an empty database, once more (new prompts, another batch) with the
first N already stored, to show that memory does not grow with the number of
prompts stored (lookups against earlier batches go through indexes in chunks).

    .venv/bin/python bench/import_prompts.py [--prompts 100000] [--quick]

The last line printed is one JSON object with prompts/s and peak RSS per run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PG_ADMIN_URL = os.environ.get("INSTRUCTLOOP_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TOPICS = [
    "gravity",
    "photosynthesis",
    "the French revolution",
    "binary search",
    "tax law",
    "sourdough bread",
    "volcanoes",
    "the stock market",
    "jazz harmony",
    "protein folding",
    "medieval castles",
    "rust lifetimes",
]
TEMPLATE = (
    "You are a careful assistant. Read the following passage about {topic} and answer the question "
    "that follows in two sentences, citing the passage where you can. Passage: "
)


def make_prompts(n: int, seed: int, tag: str) -> bytes:
    """Builds a JSON Lines file of n prompts: ~8% duplicates, ~10% shared prefixes, ~5% PII, heavy users."""
    rng = random.Random(seed)
    lines: list[str] = []
    texts: list[str] = []
    for i in range(n):
        roll = rng.random()
        user = f"{tag}-heavy-{rng.randrange(20)}" if rng.random() < 0.06 else f"{tag}-user-{rng.randrange(n // 40 + 1)}"
        topic = TOPICS[i % len(TOPICS)]
        if roll < 0.08 and texts:
            text = "  " + rng.choice(texts).upper() + " "  # same after normalisation
        elif roll < 0.18:
            # A long shared prefix (> 100 characters) with a different tail: a near duplicate.
            text = TEMPLATE.format(topic=topic) + f"{tag} note {rng.randrange(n)} on {topic}."
        elif roll < 0.23:
            pii = rng.choice(
                [
                    f"reach me at person{i}@example.com",
                    f"call +1 415-555-{i % 10000:04d}",
                    "my card is 4111 1111 1111 1111",
                ]
            )
            text = f"Prompt {tag}-{i}: draft a polite reply to a customer, {pii}, about {topic}."
        else:
            text = (
                f"Prompt {tag}-{i}: explain {topic} to a {rng.choice(['child', 'student', 'lawyer', 'chef'])} "
                f"in {rng.randrange(2, 9)} sentences, mentioning item {rng.randrange(10**6)}."
            )
        texts.append(text)
        record = {
            "text": text,
            "source_user_id": user,
            "category": rng.choice(["plain", "plain", "few-shot", "user-based"]),
        }
        if i % 10 == 0:
            record["metadata"] = {"source": "bench", "i": i}
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _import_in_child(url: str, path: str, batch_name: str, queue) -> None:
    """Runs one import in this (fresh) process and reports time, counts and peak memory."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from app.collection import batches
    from app.db import make_engine
    from app.models import Prompt

    engine = make_engine(url)
    with Session(engine) as db:
        stored_before = db.scalar(select(func.count()).select_from(Prompt))
    phases = {"parse": 0.0, "hygiene": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - t0

        return wrapper

    # Wrapped where batches looks them up, so the phases can be told apart without a second run.
    batches.parse_prompts = timed("parse", batches.parse_prompts)
    batches.apply_hygiene = timed("hygiene", batches.apply_hygiene)
    baseline = _rss_mib()
    data = Path(path).read_bytes()
    start = time.perf_counter()
    with Session(engine) as db:
        batch = batches.create_batch(db, name=batch_name)
        outcome = batches.import_prompts(db, batch, data, "jsonl")
        db.commit()
    elapsed = time.perf_counter() - start
    assert outcome.ok, outcome.errors
    report = outcome.hygiene.report
    queue.put(
        {
            "stored_before": stored_before,
            "received": report.received,
            "kept": report.kept,
            "duplicates": report.duplicates,
            "shared_prefix": report.shared_prefix,
            "pii_dropped": report.pii_dropped,
            "over_user_limit": report.over_user_limit,
            "seconds": round(elapsed, 3),
            "prompts_per_s": round(report.received / elapsed),
            "parse_s": round(phases["parse"], 3),
            "hygiene_s": round(phases["hygiene"], 3),
            "insert_and_commit_s": round(elapsed - phases["parse"] - phases["hygiene"], 3),
            "peak_rss_mib": round(_rss_mib(), 1),
            "rss_growth_mib": round(_rss_mib() - baseline, 1),
            "file_mib": round(len(data) / 2**20, 1),
        }
    )
    engine.dispose()


def run_import(url: str, path: Path, batch_name: str) -> dict:
    """Runs one import in a fresh process, so its peak memory is measured alone."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_import_in_child, args=(url, str(path), batch_name, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def main() -> None:
    from app import loop

    loop.wire()  # the services run in this process: wire the stages' reactions
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=100_000, help="prompts per import (default 100,000)")
    parser.add_argument("--quick", action="store_true", help="10,000 prompts, for a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated prompts")
    args = parser.parse_args()
    n = 10_000 if args.quick else args.prompts

    from alembic import command
    from sqlalchemy import create_engine, text

    from app.db import alembic_config

    name = f"instructloop_bench_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        command.upgrade(alembic_config(url), "head")
        with tempfile.TemporaryDirectory() as tmp:
            first, second = Path(tmp) / "first.jsonl", Path(tmp) / "second.jsonl"
            first.write_bytes(make_prompts(n, args.seed, "a"))
            second.write_bytes(make_prompts(n, args.seed + 1, "b"))
            empty = run_import(url, first, "bench-empty-db")
            print(f"into an empty database:      {empty}", flush=True)
            loaded = run_import(url, second, "bench-after-first")
            print(f"with {loaded['stored_before']:,} already stored: {loaded}", flush=True)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(
        json.dumps(
            {
                "benchmark": "import_prompts",
                "prompts": n,
                "cpu_count": os.cpu_count(),
                "empty_db": empty,
                "with_stored": loaded,
                "prompts_per_s": empty["prompts_per_s"],
                "prompts_per_s_with_stored": loaded["prompts_per_s"],
                "peak_rss_mib": empty["peak_rss_mib"],
                "peak_rss_mib_with_stored": loaded["peak_rss_mib"],
            }
        )
    )


if __name__ == "__main__":
    main()
