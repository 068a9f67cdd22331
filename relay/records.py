"""Immutable values the relay works with: claimed events and the claims that hold them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy.engine import RowMapping

from relay.messages import OutgoingMessage


class ClaimedEvent(NamedTuple):
    """An outbox row this relay holds a lease on.

    A named tuple, not a frozen dataclass, as are the other records made per event
    (`relay.messages`): as immutable, and built seven times faster (a frozen dataclass
    sets each of its fields through `object.__setattr__`), which was a tenth of the relay's
    CPU per event."""

    seq: int
    id: uuid.UUID
    type: str
    key: str | None
    aggregate_type: str | None
    aggregate_id: str | None
    routing_key: str
    correlation_id: str | None
    version: int
    payload: str
    headers: str | None
    occurred_at: dt.datetime
    attempts: int
    token: uuid.UUID

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | RowMapping, token: uuid.UUID) -> ClaimedEvent:
        return cls(
            seq=row["seq"],
            id=row["id"],
            type=row["type"],
            key=row["key"],
            aggregate_type=row["aggregate_type"],
            aggregate_id=row["aggregate_id"],
            routing_key=row["routing_key"],
            correlation_id=row["correlation_id"],
            version=row["version"],
            payload=row["payload"],
            headers=row["headers"],
            occurred_at=utc(row["occurred_at"]),
            attempts=row["attempts"],
            token=token,
        )

    @classmethod
    def from_values(cls, values: tuple[Any, ...], token: uuid.UUID) -> ClaimedEvent:
        """The event of a claimed row whose columns are `CLAIMED_COLUMNS`, in that order."""
        event = cls(*(*values, token))
        if event.occurred_at.tzinfo is None:
            return event._replace(occurred_at=utc(event.occurred_at))
        return event

    def message(self, exchange: str, *, send_by: float | None = None) -> OutgoingMessage:
        """The AMQP message: `message_id` is the event id, the same on every attempt."""
        headers: dict[str, Any] = {
            "ordering-key": self.key,
            "aggregate-type": self.aggregate_type,
            "aggregate-id": self.aggregate_id,
            "event-version": self.version,
            "outbox-seq": self.seq,
        }
        if self.headers:
            # The relay's own headers win over an application header of the same name.
            headers = {**json.loads(self.headers), **headers}
        return OutgoingMessage(
            tag=self.seq,
            exchange=exchange,
            routing_key=self.routing_key,
            body=self.payload.encode(),
            message_id=str(self.id),
            type=self.type,
            timestamp=int(self.occurred_at.timestamp()),
            headers=headers,
            correlation_id=self.correlation_id,
            send_by=send_by,
        )


def utc(occurred_at: dt.datetime) -> dt.datetime:
    """A zone-less time as the writer stored it: UTC (SQLite keeps no zone, nor does a table
    made by hand with `timestamp` rather than `timestamptz`)."""
    if occurred_at.tzinfo is None:
        return occurred_at.replace(tzinfo=dt.UTC)
    return occurred_at


# The outbox columns a claim reads, in the order of ClaimedEvent's fields (all but the
# token, which is the claim's): a claimed row is then `ClaimedEvent.from_values(row, token)`.
CLAIMED_COLUMNS = ClaimedEvent._fields[:-1]


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """Events leased together under one token; writes about them are fenced by the token."""

    token: uuid.UUID
    events: tuple[ClaimedEvent, ...]  # in write order (seq)
    lease_until: dt.datetime
    # Keys the claim may have left pending rows of: each reached its share of the claim, or
    # the claim's room ran out. The others were drained as the claim saw them.
    unfinished: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """A rejected publish of one claimed event, and what to do about it."""

    event: ClaimedEvent
    error: str
    next_attempt_at: dt.datetime | None  # None: the event is dead

    @property
    def attempt(self) -> int:
        return self.event.attempts + 1
