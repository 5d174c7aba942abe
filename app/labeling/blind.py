"""The ids a labeler sees for a task's outputs: opaque, and new for every assignment.

Completion ids follow the order outputs were sampled in. In a blind
comparison model A's outputs are sampled before model B's, so showing
completion ids told a judge which model wrote which side; and a gold task's
outputs are older than the work around it, so their ids told a labeler which
task was the check. Every output of a ranking or eval task is therefore shown
under an id derived from the secret key, the assignment and the completion:
a large integer (safe in JavaScript), different for every labeler and every
assignment. The side or slot each output is shown in is drawn at lease time
and kept in `Assignment.display_order` on the server. Only the labeling
pages and API translate between shown ids and completion ids; services work
on completion ids.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from app.config import get_settings

# Shown ids lie in [2**40, 2**41): clearly not small row ids, and exact as JavaScript numbers (below 2**53).
_BASE = 2**40


def output_id(assignment_id: int, completion_id: int) -> int:
    """The id under which an output is shown to the labeler holding `assignment_id`."""
    message = f"shown-output:{assignment_id}:{completion_id}".encode()
    digest = hmac.new(get_settings().secret_key.encode(), message, hashlib.sha256).digest()
    return _BASE + int.from_bytes(digest[:5], "big")


def shown_ids(assignment_id: int, completion_ids: Iterable[int]) -> list[int]:
    """The shown ids of outputs, in the order given."""
    return [output_id(assignment_id, cid) for cid in completion_ids]


def completion_for(assignment_id: int, shown: object, completion_ids: Iterable[int]) -> int | None:
    """Maps a shown id back to the output of this assignment it names; None when it names none."""
    if not isinstance(shown, int) or isinstance(shown, bool):
        return None
    for completion_id in completion_ids:
        if output_id(assignment_id, completion_id) == shown:
            return completion_id
    return None
