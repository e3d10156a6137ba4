"""Error codes shared by every intake and the in-process API (DESIGN.md, wire format v1).

One exception type carries them all, so an error raised deep in validation reaches an MQTT reply,
an in-process ``Future`` or a log line with the same code, message and offending field.
:class:`BackendError`, a model that cannot be loaded or run, lives here too: the backends raise it,
and so does a model's :class:`~agent.models.tensors.TensorSpec`, which the backends build on.
"""
from __future__ import annotations

BAD_REQUEST = "bad_request"
UNKNOWN_MODEL = "unknown_model"
INVALID_INPUT = "invalid_input"
TOO_LARGE = "too_large"
REJECTED = "rejected"
DEADLINE_MISSED = "deadline_missed"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"

ERROR_CODES = (
    BAD_REQUEST, UNKNOWN_MODEL, INVALID_INPUT, TOO_LARGE,
    REJECTED, DEADLINE_MISSED, SHUTTING_DOWN, INTERNAL,
)


class InferenceError(Exception):
    """A request that will not produce outputs, with the reason in wire form.

    ``code`` is one of :data:`ERROR_CODES`; ``field`` names the one request field that was wrong,
    when there is one (``inputs.frames.dtype``, ``slo_ms``...).
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; expected one of {ERROR_CODES}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def as_dict(self) -> dict:
        out = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out

    def __repr__(self) -> str:
        return f"InferenceError({self.code!r}, {self.message!r}, field={self.field!r})"


class BackendError(RuntimeError):
    """A model could not be loaded or run; the message names the file, the provider and what failed."""
