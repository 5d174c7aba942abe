"""Ranking-page keyboard benchmark: headless Chromium ranks K = 4 and K = 6 outputs by keyboard alone.

Builds a throwaway PostgreSQL database (`instructloop_bench_ranking_keys_<random>`,
dropped at the end), migrated with Alembic, with one labeler and two batches in
`labeling` (K = 4 first, then K = 6; --rankings + --baseline-rankings prompts
each), starts `python -m app.cli serve` on it, and drives Debian Chromium
(Playwright, headless) through the real ranking page: log in, open the next
ranking task, then only key presses until the page has moved on to the next
task. For each ranking it counts the key presses from page load to the submit
and the seconds from the page being ready to the next page's URL (the submit's
round trip and the navigation included; Playwright types with no human delay,
so this is the page's and the server's speed, not a person's).

The fast path (what the page teaches): focus starts on output A; per output a
digit 1..K for its rank slot, then a digit 1..7 for its Likert score (focus then
moves on by itself); Enter submits. 2K + 1 keys.

Baseline, measured in the same run on the same page: the path that was the only
keyboard one before, arrows between outputs and Tab / Space / arrow keys into
each card's 1-7 radio group: per output a slot digit and an arrow, then per
output Tab, Space, (score - 1) arrows, Tab, Tab; Ctrl+Enter submits. Scores are
drawn uniformly from 1..7 with a fixed seed, the same draws for both paths.
Every stored ranking is checked against what was typed.

    .venv/bin/python bench/ranking_keys.py            # 10 fast + 3 baseline rankings per K
    .venv/bin/python bench/ranking_keys.py --quick    # 3 fast + 1 baseline ranking per K

The last line of stdout is one JSON object: `k`, `keystrokes_per_ranking` and
`seconds_per_ranking` per K (lists in K order, and by K), the baseline's, their
ratios, and `ok` (every fast ranking within 2K + 2 keys and stored as typed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import create_database, drop_database, emit, start_server, stop_server, wire_loop  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KS = (4, 6)
USERNAME = "bench-ranker"
PASSWORD = "bench-password-1234"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rankings", type=int, default=10, help="rankings per K on the fast (2K + 1 keys) path")
    parser.add_argument("--baseline-rankings", type=int, default=3, help="rankings per K on the Tab/arrow path")
    parser.add_argument("--quick", action="store_true", help="a small run: 3 fast and 1 baseline ranking per K")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slots and scores typed")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("INSTRUCTLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create databases",
    )
    parser.add_argument("--keep-db", action="store_true", help="do not drop the benchmark database")
    args = parser.parse_args()
    if args.quick:
        args.rankings, args.baseline_rankings = 3, 1
    return args


def seed(url: str, per_k: int) -> None:
    """Loads the labeler and one batch per K (K = 4 first by priority), each with `per_k` prompts and tasks."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.collection.batches import create_tasks
    from app.models import Completion, ModelVersion, Prompt, PromptBatch, User
    from app.security import hash_password

    engine = create_engine(url)
    with Session(engine) as db:
        db.add(User(username=USERNAME, role="labeler", password_hash=hash_password(PASSWORD)))
        model = ModelVersion(name="bench-base", kind="base", status="ready", artifact_path="/nonexistent")
        db.add(model)
        db.flush()
        for priority, k in zip((len(KS) - i for i in range(len(KS))), KS, strict=True):
            batch = PromptBatch(
                name=f"bench-keys-k{k}-{uuid.uuid4().hex[:6]}",
                status="labeling",
                k=k,
                overlap=1,
                priority=priority,
                wants_rankings=True,
                wants_demonstrations=False,
                guidelines="Rank by **correctness**, then concision.",
            )
            db.add(batch)
            db.flush()
            for i in range(per_k):
                text = f"K={k}, prompt {i}: what is {i} + {k}?"
                prompt = Prompt(batch_id=batch.id, text=text, normalized_key=hashlib.sha256(text.encode()).hexdigest())
                db.add(prompt)
                db.flush()
                db.add_all(
                    Completion(prompt_id=prompt.id, model_version_id=model.id, text=f"Answer {j}: {i + k + j - 1}")
                    for j in range(k)
                )
            db.flush()
            create_tasks(db, batch)
        db.commit()
    engine.dispose()


def stored_ranking(url: str, assignment_id: int) -> dict[int, tuple[int, int]]:
    """Maps each output's position on the page (0 = A) to its stored (dense rank, Likert)."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from app.models import Ranking, RankingItem

    engine = create_engine(url)
    with Session(engine) as db:
        ranking_id = db.scalar(select(Ranking.id).where(Ranking.assignment_id == assignment_id))
        rows = db.execute(
            select(RankingItem.position, RankingItem.rank, RankingItem.likert).where(
                RankingItem.ranking_id == ranking_id
            )
        ).all()
    engine.dispose()
    return {row.position: (row.rank, row.likert) for row in rows}


def dense(slots: list[int]) -> list[int]:
    """The server stores ranks dense (slots 1, 3, 3 become 1, 2, 2)."""
    order = sorted(set(slots))
    return [order.index(s) + 1 for s in slots]


def fast_keys(slots: list[int], scores: list[int]) -> list[str]:
    """Slot digit, score digit per output, then Enter: 2K + 1 keys."""
    keys = []
    for slot, score in zip(slots, scores, strict=True):
        keys += [str(slot), str(score)]
    return [*keys, "Enter"]


def baseline_keys(slots: list[int], scores: list[int]) -> list[str]:
    """The Tab/arrow path: slot digit and an arrow per output, then Tab, Space, arrows, Tab, Tab per output."""
    keys = []
    for slot in slots:
        keys += [str(slot), "ArrowDown"]  # the last arrow wraps around to output A
    for score in scores:
        keys += ["Tab", "Space", *["ArrowRight"] * (score - 1), "Tab", "Tab"]
    return [*keys, "Control+Enter"]


def run(base: str, url: str, args: argparse.Namespace) -> dict:
    """Ranks every seeded task in Chromium by keyboard; returns the figures per K and path."""
    from playwright.sync_api import sync_playwright

    rng = random.Random(args.seed)
    done: dict[int, dict[str, list[tuple[int, float]]]] = {k: {"fast": [], "baseline": []} for k in KS}
    mismatches: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.set_default_timeout(30000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/login")
        page.fill("input[name=username]", USERNAME)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/label")
        page.goto(base + "/label/next?kind=ranking")
        while True:
            page.wait_for_load_state("load")
            if page.get_by_test_id("nothing-left").count():
                break
            page.get_by_test_id("ranking-page").wait_for()
            assignment_id = int(page.url.rsplit("/", 1)[1])
            k = page.get_by_test_id("output-card").count()
            path = "baseline" if len(done[k]["baseline"]) < args.baseline_rankings else "fast"
            slots = [rng.randint(1, k) for _ in range(k)]
            scores = [rng.randint(1, 7) for _ in range(k)]
            keys = (baseline_keys if path == "baseline" else fast_keys)(slots, scores)
            start = time.perf_counter()
            for key in keys:
                page.keyboard.press(key)
            page.wait_for_url(lambda u, a=assignment_id: not u.endswith(f"/assignments/{a}"))
            seconds = time.perf_counter() - start
            done[k][path].append((len(keys), seconds))
            expected = dict(enumerate(zip(dense(slots), scores, strict=True)))
            got = stored_ranking(url, assignment_id)
            if got != expected:
                mismatches.append(f"assignment {assignment_id} ({path}, K={k}): typed {expected}, stored {got}")
        browser.close()
    return {"done": done, "mismatches": mismatches, "page_errors": errors}


def main() -> int:
    args = parse_args()
    wire_loop()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (apt-get install -y chromium)", file=sys.stderr)
        return 2
    name = f"instructloop_bench_ranking_keys_{uuid.uuid4().hex[:8]}"
    data_dir = Path(tempfile.mkdtemp(prefix="bench-ranking-keys-"))
    url = create_database(args.pg_admin_url, name)
    proc = None
    try:
        seed(url, args.rankings + args.baseline_rankings)
        proc, base = start_server(url, 1, data_dir, data_dir / "server.log")
        result = run(base, url, args)
    finally:
        if proc is not None:
            stop_server(proc)
        if not args.keep_db:
            drop_database(args.pg_admin_url, name)
        shutil.rmtree(data_dir, ignore_errors=True)

    by_k = {}
    for k in KS:
        fast, baseline = result["done"][k]["fast"], result["done"][k]["baseline"]
        keys = round(statistics.mean(n for n, _ in fast), 2)
        seconds = statistics.median(s for _, s in fast)
        base_keys = round(statistics.mean(n for n, _ in baseline), 2) if baseline else None
        base_seconds = statistics.median(s for _, s in baseline) if baseline else None
        by_k[str(k)] = {
            "rankings": len(fast),
            "keystrokes_per_ranking": keys,
            "max_keystrokes": max(n for n, _ in fast),
            "limit_2k_plus_2": 2 * k + 2,
            "seconds_per_ranking": round(seconds, 3),
            "baseline_rankings": len(baseline),
            "baseline_keystrokes_per_ranking": base_keys,
            "baseline_seconds_per_ranking": round(base_seconds, 3) if base_seconds else None,
            "keystrokes_ratio_to_baseline": round(keys / base_keys, 3) if base_keys else None,
            "seconds_ratio_to_baseline": round(seconds / base_seconds, 3) if base_seconds else None,
        }
        print(
            f"K={k}: {keys:.1f} keys (limit {2 * k + 2}), {seconds:.3f} s per ranking; "
            f"baseline {base_keys} keys, {base_seconds} s",
            file=sys.stderr,
        )
    ok = (
        not result["mismatches"]
        and not result["page_errors"]
        and all(v["max_keystrokes"] <= v["limit_2k_plus_2"] and v["rankings"] == args.rankings for v in by_k.values())
    )
    return emit(
        {
            "benchmark": "ranking_keys",
            "quick": args.quick,
            "k": list(KS),
            "keystrokes_per_ranking": [by_k[str(k)]["keystrokes_per_ranking"] for k in KS],
            "seconds_per_ranking": [by_k[str(k)]["seconds_per_ranking"] for k in KS],
            "by_k": by_k,
            "mismatches": result["mismatches"],
            "page_errors": result["page_errors"],
            "ok": ok,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
