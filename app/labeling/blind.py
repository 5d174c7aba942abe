"""Blind comparisons: the ids a judge sees for the two outputs of an eval task.

Completion ids follow the order the outputs were sampled in, model A's batch
before model B's, so showing them told a judge which model wrote which side.
An eval task's outputs are shown under opaque ids instead, keyed by the
secret key and the assignment: the same output has another id for every
judge and every assignment, all of one length. The side each output is shown
on is drawn at lease time and kept in `Assignment.display_order`; the
judgment records which model was shown first. Only the server maps an opaque
id back to its output.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from app.config import get_settings

PREFIX = "out_"


def output_id(assignment_id: int, completion_id: int) -> str:
    """The id under which an output of an eval task is shown to the labeler holding `assignment_id`."""
    message = f"blind-output:{assignment_id}:{completion_id}".encode()
    digest = hmac.new(get_settings().secret_key.encode(), message, hashlib.sha256).hexdigest()
    return PREFIX + digest[:24]


def completion_for(assignment_id: int, shown: str, completion_ids: Iterable[int]) -> int | None:
    """Maps an opaque id back to the output of this assignment it names; None when it names none."""
    for completion_id in completion_ids:
        if hmac.compare_digest(output_id(assignment_id, completion_id), shown):
            return completion_id
    return None
