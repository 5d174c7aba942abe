"""Cross-stage reactions go through app.events: the registrations exist, and misuse fails loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import events
from app.quality import evaluations
from app.registry import versions
from app.webhooks import service as webhooks


def test_every_reaction_of_the_loop_is_subscribed():
    assert evaluations.on_batch_completed in events.subscribers("batch.completed")
    assert versions.promote_if_won in events.subscribers("evaluation.completed")
    for event in ("batch.completed", "model_version.registered", "model_version.promoted", "training_run.failed"):
        assert webhooks.queue_deliveries in events.subscribers(event)


def test_an_unknown_event_or_a_missing_payload_key_is_refused(db):
    with pytest.raises(ValueError, match=r"unknown event 'batch\.finished'"):
        events.emit(db, "batch.finished", {"batch_id": 1})
    with pytest.raises(ValueError, match=r"batch\.completed needs name"):
        events.emit(db, "batch.completed", {"batch_id": 1})
    with pytest.raises(ValueError, match="unknown event"):
        events.on("batch.finished")


def test_a_process_that_did_not_wire_the_stages_cannot_emit():
    # A fresh interpreter that imports a stage but never calls app.loop.wire(): reactions would be lost, so emit raises.
    code = (
        "from app import events\n"
        "try:\n"
        "    events.emit(None, 'batch.completed', {'batch_id': 1, 'name': 'x'})\n"
        "except events.NotWired as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused: batch.completed emitted before app.loop.wire()")
