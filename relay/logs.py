"""Logging for the daemon: one line per event worth knowing, text for people, JSON for machines.
Every message passes through URL-password masking.

In JSON mode a line about one event carries its `event_id`, `event_type` and `event_key` as
top-level keys (the call sites pass them with `extra=`, see `event_fields`), so that a log
search for one event finds every line about it without parsing messages. Other known context
(`attempt`, `relay`, `consumer`, ...) is emitted the same way when present; `relay` and
`consumer` are put on every line of a daemon by `add_log_context`. Text mode is unchanged: the
message itself names the event.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import uuid
from typing import Any

from relay.urls import mask_text

EVENT_FIELDS = ("event_id", "event_type", "event_key")
"""Carried by every line about one event (`event_key` is null for an event without a key)."""

CONTEXT_FIELDS = (
    "attempt",
    "max_attempts",
    "next_attempt_at",
    "seq",
    "reason",
    "relay",
    "consumer",
)
"""Further `extra=` fields the JSON formatter emits when a line has them."""

_FIELDS = EVENT_FIELDS + CONTEXT_FIELDS


def event_fields(
    event_id: object, event_type: str | None, event_key: str | None, **context: Any
) -> dict[str, Any]:
    """The `extra=` of a log call about one event: its id, type and key, and `context`
    (names from `CONTEXT_FIELDS`)."""
    unknown = set(context) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}: add them to CONTEXT_FIELDS")
    return {"event_id": event_id, "event_type": event_type, "event_key": event_key, **context}


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return mask_text(str(value))


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_text(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_text(record.getMessage()),
        }
        fields = record.__dict__
        for name in _FIELDS:
            if name in fields:
                entry[name] = _json_value(fields[name])
        if record.exc_info:
            entry["exception"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class _Context(logging.Filter):
    """Puts fixed fields (the relay's or consumer's name) on every record that lacks them."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if name not in record.__dict__:
                setattr(record, name, value)
        return True


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.WARNING)


def add_log_context(**fields: str) -> None:
    """Put `fields` (e.g. `relay=name`) on every line the root logger's handlers write from
    now on: the daemons call it once they know their name."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}: add them to CONTEXT_FIELDS")
    context = _Context(fields)
    for handler in logging.getLogger().handlers:
        handler.addFilter(context)
