"""The one shape of a user-caused error: which field is wrong, why, and the HTTP status that says so.

Every service raises a subclass (BatchError, LabelingError, ...), so routes turn any of them into the
same answer: the status, and a message that starts with the field's name (`items[2].likert: ...`).
"""

from __future__ import annotations

from pydantic import ValidationError


class FieldError(ValueError):
    """A user-caused problem; `field` names what is wrong, `message` says why, `status` is the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def first_validation_error(exc: ValidationError) -> tuple[str, str]:
    """Returns (field, message) of the first problem pydantic found, e.g. for a form shown again with it."""
    err = exc.errors()[0]
    return ".".join(str(part) for part in err["loc"]) or "form", err["msg"]
