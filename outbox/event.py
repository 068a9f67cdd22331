"""The event envelope: an immutable domain fact and everything the relay needs to deliver it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import uuid
from collections.abc import Mapping
from typing import Any

from uuid6 import uuid7

from outbox.errors import InvalidEventError

DEFAULT_VERSION = 1
_NO_WHITESPACE = re.compile(r"^\S+$")
# AMQP short strings (routing key, message_id, type, ...) are at most 255 bytes.
MAX_SHORT_STRING = 255
RESERVED_HEADERS = frozenset(
    {"ordering-key", "aggregate-type", "aggregate-id", "event-version", "outbox-seq"}
)
"""Headers the relay sets on every message. An application header of the same name would be
overwritten on the wire, so `Event` refuses them (compared case-insensitively)."""


def new_event_id() -> uuid.UUID:
    """A UUIDv7: unique, and time-ordered so ids sort roughly by creation time."""
    return uuid7()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _no_nul(value: str, field: str) -> None:
    # PostgreSQL text cannot hold a NUL byte: refuse it here rather than fail at insert.
    if "\x00" in value:
        raise InvalidEventError(f"{field} {value!r} contains a NUL byte (\\x00): remove it")


def _short_string(value: str | None, field: str, *, allow_spaces: bool = True) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidEventError(f"{field} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidEventError(f"{field} must not be empty")
    _no_nul(value, field)
    if not allow_spaces and not _NO_WHITESPACE.match(value):
        raise InvalidEventError(f"{field} {value!r} must not contain whitespace")
    if len(value.encode()) > MAX_SHORT_STRING:
        raise InvalidEventError(
            f"{field} is {len(value.encode())} bytes; AMQP allows at most {MAX_SHORT_STRING}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """A domain event as it is stored in the outbox and published to the broker.

    `id` is the dedup id: it travels as AMQP `message_id` and never changes across retries.
    `key` orders events: the relay delivers the events of one key in the order they were
    written. It defaults to ``"{aggregate_type}:{aggregate_id}"`` when both are given; an
    event without a key is never held back by other events.
    """

    type: str
    payload: Any = None
    key: str | None = None
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    routing_key: str | None = None
    correlation_id: str | None = None
    version: int = DEFAULT_VERSION
    occurred_at: dt.datetime = dataclasses.field(default_factory=_utcnow)
    id: uuid.UUID = dataclasses.field(default_factory=new_event_id)

    def __post_init__(self) -> None:
        _short_string(self.type, "event type", allow_spaces=False)
        if not isinstance(self.aggregate_id, str | None):
            # Accept ints and UUIDs: ids are compared as text on the wire.
            if isinstance(self.aggregate_id, bool) or not isinstance(
                self.aggregate_id, int | uuid.UUID
            ):
                raise InvalidEventError(
                    f"aggregate_id must be a str, int or UUID, "
                    f"got {type(self.aggregate_id).__name__}"
                )
            object.__setattr__(self, "aggregate_id", str(self.aggregate_id))
        _short_string(self.aggregate_type, "aggregate_type")
        _short_string(self.aggregate_id, "aggregate_id")
        if (self.aggregate_type is None) != (self.aggregate_id is None):
            given, missing = (
                ("aggregate_type", "aggregate_id")
                if self.aggregate_id is None
                else ("aggregate_id", "aggregate_type")
            )
            raise InvalidEventError(
                f"{given} is set but {missing} is None: an event names its aggregate with both "
                "or neither (its ordering key is built from both). For a new aggregate, flush "
                "the session first so that it has an id, or record the event with "
                "aggregate.record(), which fills the id in at flush"
            )
        if self.key is None and self.aggregate_type and self.aggregate_id:
            object.__setattr__(self, "key", f"{self.aggregate_type}:{self.aggregate_id}")
        _short_string(self.key, "ordering key")
        if self.routing_key is None:
            object.__setattr__(self, "routing_key", self.type)
        _short_string(self.routing_key, "routing_key", allow_spaces=False)
        _short_string(self.correlation_id, "correlation_id")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise InvalidEventError(f"version must be an int, got {type(self.version).__name__}")
        if self.version < 1:
            raise InvalidEventError(f"version must be 1 or more, got {self.version}")
        if not isinstance(self.id, uuid.UUID):
            raise InvalidEventError(f"id must be a uuid.UUID, got {type(self.id).__name__}")
        if not isinstance(self.occurred_at, dt.datetime):
            raise InvalidEventError("occurred_at must be a datetime")
        if self.occurred_at.tzinfo is None:
            raise InvalidEventError(
                "occurred_at is a naive datetime: pass a timezone-aware one, e.g. datetime.now(UTC)"
            )
        object.__setattr__(self, "occurred_at", self.occurred_at.astimezone(dt.UTC))
        object.__setattr__(self, "headers", _frozen_headers(self.headers))

    def with_aggregate(self, aggregate_type: str, aggregate_id: str) -> Event:
        """This event attributed to an aggregate (its key follows unless it was set)."""
        return dataclasses.replace(self, aggregate_type=aggregate_type, aggregate_id=aggregate_id)


def _frozen_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    if not isinstance(headers, Mapping):
        raise InvalidEventError(f"headers must be a mapping, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidEventError(f"header name {name!r} must be a non-empty str")
        if name.lower() in RESERVED_HEADERS:
            raise InvalidEventError(
                f"header {name!r} is set by the relay on every message "
                f"({', '.join(sorted(RESERVED_HEADERS))}) and would be overwritten: "
                "use another name, or the Event field that sets it (key, aggregate_type, "
                "aggregate_id, version)"
            )
        _no_nul(name, "header name")
        if len(name.encode()) > MAX_SHORT_STRING:
            raise InvalidEventError(
                f"header name {name[:40]!r}... is {len(name.encode())} bytes; AMQP allows at "
                f"most {MAX_SHORT_STRING}"
            )
        if not isinstance(value, str):
            raise InvalidEventError(
                f"header {name!r} has a {type(value).__name__} value; header values must be "
                f"str (convert it, e.g. str(value))"
            )
        _no_nul(value, f"header {name!r}")
    return types.MappingProxyType(dict(headers))
