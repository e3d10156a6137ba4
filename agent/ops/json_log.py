"""Structured logs: one JSON object per line on stdout, for journald and what reads it.

Run as a system service (``edge-agent run`` under systemd), the agent's stdout goes to the
journal; a JSON line there can be filtered by field (``journalctl -o cat | jq 'select(.level ==
"ERROR")'``) or shipped to a log store that indexes fields, where a text line needs a parser per
message. ``[agent] log_format = "json"`` (or ``edge-agent --log-format json``) selects it.

Each line has ``ts`` (UTC, ISO 8601 with microseconds), ``level``, ``logger`` and ``msg`` (the
formatted message), ``exc`` when an exception is logged, and every ``extra={...}`` field a log
call passes (a value JSON cannot hold is written as its ``repr``).
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

__all__ = ["JsonFormatter", "json_line", "configure_logging", "LOG_FORMATS"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has: anything else on a record came from a call's ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def json_line(level: str, logger: str, msg: str, created: float | None = None, **fields: object) -> str:
    """One log line: ``{"ts", "level", "logger", "msg", **fields}`` as compact JSON."""
    when = datetime.fromtimestamp(created, timezone.utc) if created is not None else datetime.now(timezone.utc)
    record = {"ts": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
              "level": level, "logger": logger, "msg": msg, **fields}
    return json.dumps(record, default=repr, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """A ``logging.Formatter`` that writes each record as :func:`json_line`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {key: value for key, value in vars(record).items() if key not in _STANDARD}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return json_line(record.levelname, record.name, record.getMessage(), record.created, **fields)


def configure_logging(level: int, log_format: str = "text") -> None:
    """The root logger at ``level``: text lines on stderr (as before), or JSON lines on stdout."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {LOG_FORMATS}")
    if log_format == "json":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler], force=True)
    else:   # as before JSON logs existed: a no-op where the root logger has handlers already (pytest's)
        logging.basicConfig(level=level, format=TEXT_FORMAT)
