"""Wires the stages of the loop together: imports every module that reacts to another stage's events.

Each process calls `wire()` once at start (the web app factory, the Celery
app, the CLI, the test harness). It is the one place that knows every stage,
so no stage has to import a later one to react to it.
"""

from __future__ import annotations

from app import events


def wire() -> None:
    """Registers every stage's event handlers; safe to call more than once."""
    # Imported for their @events.on subscriptions.
    from app.quality import evaluations  # noqa: F401  batch.completed → score the evaluation
    from app.registry import versions  # noqa: F401  evaluation.completed → promote a winner
    from app.webhooks import service  # noqa: F401  the public events → webhook deliveries

    events.mark_wired()
