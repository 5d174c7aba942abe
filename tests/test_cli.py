"""The `instructloop` console script as an operator runs it: a subprocess on the test database.

The installed script is run with this checkout first on PYTHONPATH, so it is
this tree's code behind the real entry point. Its data must be committed to
be seen by the subprocess (`committed` empties the tables afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.models import ModelVersion, Prompt, PromptBatch
from tests.conftest import ROOT

SCRIPT = Path(sys.executable).parent / "instructloop"


def instructloop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs the console script with the test database's environment; returns the finished process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")  # wide enough that no message line wraps
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_import_prompts_stores_the_kept_rows_and_reports_hygiene(committed_session, tmp_path):
    db = committed_session
    file = tmp_path / "prompts.jsonl"
    file.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {"text": "Sort 3 1 2.", "source_user_id": "ann", "category": "plain"},
                {"text": "Reverse the word lamp.", "source_user_id": "ann"},
                {"text": "Count the vowels in banana.", "source_user_id": "bob", "category": "few-shot"},
                {"text": "sort 3 1 2.", "source_user_id": "bob"},  # the first line again, once normalised
            ]
        )
        + "\n"
    )
    done = instructloop("import-prompts", str(file), "--batch", "cli-batch")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["stored"], summary["replaced"]) == (3, 0)
    assert summary["hygiene"]["received"] == 4 and summary["hygiene"]["duplicates"] == 1
    assert "created draft batch cli-batch" in done.stderr  # messages go to stderr, the JSON summary to stdout

    batch = db.scalar(select(PromptBatch).where(PromptBatch.name == "cli-batch"))
    assert batch.id == summary["batch_id"] and batch.status == "draft"
    rows = db.execute(
        select(Prompt.text, Prompt.source_user_id, Prompt.category, Prompt.split, Prompt.source_line)
        .where(Prompt.batch_id == batch.id)
        .order_by(Prompt.source_line)
    ).all()
    assert [(r.text, r.source_user_id, r.category, r.source_line) for r in rows] == [
        ("Sort 3 1 2.", "ann", "plain", 1),
        ("Reverse the word lamp.", "ann", "plain", 2),
        ("Count the vowels in banana.", "bob", "few-shot", 3),
    ]
    assert rows[0].split == rows[1].split  # one source user, one split

    # Into the same batch again: the same texts are duplicates of the batch's own prompts now.
    again = instructloop("import-prompts", str(file), "--batch", "cli-batch")
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["stored"] == 0


def test_import_prompts_refuses_a_bad_file_by_line_and_imports_nothing(committed_session, tmp_path):
    db = committed_session
    file = tmp_path / "bad.jsonl"
    file.write_text('{"text": "A fine prompt."}\n{"source_user_id": "ann"}\n{not json\n{"text": "Another."}\n')
    failed = instructloop("import-prompts", str(file), "--batch", "bad-batch")
    assert failed.returncode == 1
    lines = failed.stderr.splitlines()
    assert any(line.startswith("line 2: text:") for line in lines), failed.stderr
    assert any(line.startswith("line 3: ") for line in lines), failed.stderr
    assert "2 errors; nothing was imported" in failed.stderr and failed.stdout == ""
    db.expire_all()
    assert db.scalar(select(PromptBatch).where(PromptBatch.name == "bad-batch")) is None  # not even the batch
    assert db.scalar(select(func.count()).select_from(Prompt)) == 0
    missing = instructloop("import-prompts", str(tmp_path / "absent.jsonl"), "--batch", "bad-batch")
    assert missing.returncode == 2 and "does not exist" in missing.stdout + missing.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_world_pretrain_registers_a_base_version_whose_folder_loads(committed_session, tmp_path):
    from worker.generate import sample_completions
    from worker.modeling import load_model

    out = tmp_path / "world-base"
    done = instructloop("world", "pretrain", "--out", str(out), "--steps", "3", "--seed", "1", timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    version = committed_session.scalar(select(ModelVersion).where(ModelVersion.artifact_path == str(out)))
    assert version is not None and version.kind == "base" and version.status in ("ready", "promoted")
    assert f"registered model version {version.name}" in done.stderr
    assert version.metrics["parameters"] > 0 and "final_held_out_loss" in version.metrics
    model, tokenizer = load_model(out, device="cpu")
    assert model.num_parameters() == version.metrics["parameters"]
    outputs = sample_completions(model, tokenizer, ["What is 2 + 3?"], 2, temperature=1.0, max_new_tokens=4)
    assert len(outputs) == 1 and len(outputs[0]) == 2 and all(isinstance(t, str) for t in outputs[0])
