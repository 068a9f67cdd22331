"""What the operator commands read and pass: status, dead letters, one event's history, and
the selection and plan of a repair. Immutable values, each with `to_json()` for the CLI's
`--json` output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

from relay.errors import ConfigError


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite keeps no time zone: the relay and the writer store UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    aware = as_utc(value)
    return aware.isoformat() if aware is not None else None


@dataclasses.dataclass(frozen=True, slots=True)
class ActiveRelay:
    name: str
    host: str
    pid: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    broker_node: str | None = None  # host:port; None while disconnected

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "started_at": iso(self.started_at),
            "heartbeat_at": iso(self.heartbeat_at),
            "broker_node": self.broker_node,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxGauges:
    """The cheap numbers a metrics scrape needs (one query)."""

    pending: int
    dead: int
    oldest_pending_age: float | None  # seconds; None when nothing is pending
    held_keys: int  # keys a dead letter holds: their later events wait for a requeue or purge
    active_relays: int  # relays whose heartbeat is recent (as in `status`)


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxStatus:
    table: str
    checked_at: dt.datetime
    pending: int  # every pending row, including the two below
    in_flight: int  # pending and leased by a relay
    waiting_retry: int  # pending, not leased, next attempt in the future
    dead: int
    published: int  # kept for retention
    oldest_pending_age: float | None
    keys_held_back: int  # keys whose later rows wait behind a dead or retry-waiting row
    relays: tuple[ActiveRelay, ...]
    schema_problems: tuple[str, ...] = ()  # what `outbox-relay init-db` would fix

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "checked_at": iso(self.checked_at),
            "pending": self.pending,
            "in_flight": self.in_flight,
            "waiting_retry": self.waiting_retry,
            "dead": self.dead,
            "published": self.published,
            "oldest_pending_age_seconds": self.oldest_pending_age,
            "keys_held_back": self.keys_held_back,
            "active_relays": [relay.to_json() for relay in self.relays],
            "schema_problems": list(self.schema_problems),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Selector:
    """Which dead letters an operator means: ids, everything, or filters (combined with AND)."""

    ids: tuple[uuid.UUID, ...] = ()
    everything: bool = False
    type: str | None = None
    key: str | None = None
    since: dt.datetime | None = None  # last failure at or after this time

    def __post_init__(self) -> None:
        filters = self.type is not None or self.key is not None or self.since is not None
        if self.ids and (self.everything or filters):
            raise ConfigError("event ids cannot be combined with --all, --type, --key or --since")
        if self.everything and filters:
            raise ConfigError("--all cannot be combined with --type, --key or --since")
        if not (self.ids or self.everything or filters):
            raise ConfigError(
                "say which dead letters: event ids, --all, or --type/--key/--since filters"
            )
        object.__setattr__(self, "ids", tuple(dict.fromkeys(self.ids)))

    @classmethod
    def filters(
        cls,
        *,
        type: str | None = None,
        key: str | None = None,
        since: dt.datetime | None = None,
    ) -> Selector | None:
        """A selector for listing: None (no filter) when nothing is given."""
        if type is None and key is None and since is None:
            return None
        return cls(type=type, key=key, since=since)

    def describe(self) -> str:
        if self.ids:
            return f"{len(self.ids)} named dead letter{'s' if len(self.ids) != 1 else ''}"
        if self.everything:
            return "all dead letters"
        parts = []
        if self.type is not None:
            parts.append(f"type {self.type!r}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        if self.since is not None:
            parts.append(f"last failure since {iso(self.since)}")
        return "dead letters with " + " and ".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    id: uuid.UUID
    type: str
    key: str | None
    routing_key: str
    attempts: int
    last_error: str | None
    occurred_at: dt.datetime
    last_failed_at: dt.datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "seq": self.seq,
            "type": self.type,
            "key": self.key,
            "routing_key": self.routing_key,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "occurred_at": iso(self.occurred_at),
            "last_failed_at": iso(self.last_failed_at),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class FailureRecord:
    attempt: int
    failed_at: dt.datetime
    relay: str | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "failed_at": iso(self.failed_at),
            "relay": self.relay,
            "error": self.error,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class EventDetail:
    """One outbox row in full, with its failure history (oldest first)."""

    row: dict[str, Any]
    failures: tuple[FailureRecord, ...]

    @property
    def id(self) -> uuid.UUID:
        value: uuid.UUID = self.row["id"]
        return value

    @property
    def status(self) -> str:
        return str(self.row["status"])

    def to_json(self) -> dict[str, Any]:
        row = self.row
        out: dict[str, Any] = {}
        for name, value in row.items():
            if name in ("claim_token",):
                continue
            if isinstance(value, dt.datetime):
                out[name] = iso(value)
            elif isinstance(value, uuid.UUID):
                out[name] = str(value)
            else:
                out[name] = value
        out["payload"] = _json_or_text(row["payload"])
        out["headers"] = _json_or_text(row["headers"]) if row["headers"] else {}
        out["failures"] = [failure.to_json() for failure in self.failures]
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What a requeue or purge would touch, counted before anything changes.

    The repair stops at `last_seq`: rows that die after the operator confirmed are left alone.
    """

    selector: Selector
    count: int
    keys: int
    last_seq: int | None


def _json_or_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
