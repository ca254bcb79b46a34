"""Log lines of every role: human-readable text by default, JSON lines with `log.format = "json"`.

Both carry the fields of `app.core.log_context` (`job_id`, `schedule`, `worker`) on each line
that concerns one: text appends those the message does not already show, as ` [worker=...]`;
JSON has them as keys beside `ts`, `level`, `logger` and `message` (and `exc`, a traceback).
The fields are read by a handler filter, which runs only for a line that is emitted.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from app.core.log_context import LOG_FIELDS, log_fields

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# connection-level libraries: a pooled connection made while a task worked for one job is not
# that job's, though it keeps the context it was made in
_NOT_ATTRIBUTED = ("grpclib.", "h2.", "hpack.", "asyncio", "hypercorn.", "redis.")

_encode = msgspec.json.Encoder().encode


class LogFieldsFilter(logging.Filter):
    """Puts the context's log fields on each record it passes (a field given in `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the fields; every record passes."""
        fields = log_fields()
        if fields and not record.name.startswith(_NOT_ATTRIBUTED):
            for name, value in fields.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


def _fields_of(record: logging.LogRecord) -> list[tuple[str, str]]:
    found = []
    for name in LOG_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            found.append((name, str(value)))
    return found


class TextFormatter(logging.Formatter):
    """The classic line, then ` [job_id=... worker=...]` for fields the message does not show."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The line (a traceback follows it, as logging's own formatter puts it)."""
        line = super().format(record)
        fields = _fields_of(record)
        if not fields:
            return line
        message = record.getMessage()
        extra = " ".join(f"{k}={v}" for k, v in fields if v not in message)
        if not extra:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{extra}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, message, the fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields_of(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _encode(entry).decode()


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in `log_format`, with the log fields filter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(LogFieldsFilter())
    return handler
