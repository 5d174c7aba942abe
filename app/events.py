"""Domain events: how one stage of the loop reacts to what happened in another without importing it.

The stages import each other in one direction only, along the data's walk
(collection → labeling → quality → export → training → registry). A reaction
that runs against that direction — a batch completes and its evaluation must
be scored; an evaluation completes and the registry may promote its winner;
anything happens that webhooks announce — goes through here: the stage where
it happens calls `emit`, and the stage that reacts subscribes with `@on`.

Handlers run synchronously, in order of subscription, inside the caller's
transaction, so a reaction commits or rolls back with what caused it. The
subscribing modules are imported by `app.loop.wire()`, which every process
(web, worker, CLI, tests) calls once at start; emitting before that raises,
so a process that forgot to wire fails loudly instead of silently skipping
reactions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

Handler = Callable[[Session, str, dict[str, Any]], None]  # (session, event name, payload)

# The events, with the payload keys each carries.
EVENTS: dict[str, tuple[str, ...]] = {
    "batch.completed": ("batch_id", "name"),
    "evaluation.completed": ("evaluation_id",),
    "model_version.registered": ("model_version_id", "name", "kind", "status", "parent_id"),
    "model_version.promoted": ("model_version_id", "name", "kind", "status", "parent_id"),
    "training_run.failed": ("run_id", "kind", "batch_id", "error"),
}

_handlers: dict[str, list[Handler]] = defaultdict(list)
_wired = False


class NotWired(RuntimeError):
    """An event was emitted before `app.loop.wire()` registered the stages' handlers."""


def on(*events: str) -> Callable[[Handler], Handler]:
    """Subscribes the decorated function to one or more events."""
    unknown = [event for event in events if event not in EVENTS]
    if unknown:
        raise ValueError(f"unknown event(s): {', '.join(unknown)}")

    def register(handler: Handler) -> Handler:
        for event in events:
            if handler not in _handlers[event]:
                _handlers[event].append(handler)
        return handler

    return register


def emit(db: Session, event: str, payload: dict[str, Any]) -> None:
    """Runs every handler subscribed to `event` in the caller's transaction."""
    if not _wired:
        raise NotWired(f"{event} emitted before app.loop.wire(): its reactions would be lost")
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    missing = set(EVENTS[event]) - set(payload)
    if missing:
        raise ValueError(f"{event} needs {', '.join(sorted(missing))}")
    for handler in _handlers[event]:
        handler(db, event, payload)


def mark_wired() -> None:
    """Records that every stage's handlers are registered (called by `app.loop.wire`)."""
    global _wired
    _wired = True


def subscribers(event: str) -> list[Handler]:
    """Lists the handlers of an event (for tests and the architecture page)."""
    return list(_handlers[event])
