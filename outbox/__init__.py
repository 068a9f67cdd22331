"""The transactional outbox: record domain events in the application's own transaction."""

from outbox.aggregate import AggregateRoot, install
from outbox.errors import (
    ClosedBindError,
    InvalidEventError,
    NotInstalledError,
    OutboxError,
    PayloadNotSerializableError,
    UnsupportedBindError,
)
from outbox.event import Event, new_event_id
from outbox.schema import Outbox
from outbox.writer import DEFAULT_OUTBOX, write, write_async

__all__ = [
    "DEFAULT_OUTBOX",
    "AggregateRoot",
    "ClosedBindError",
    "Event",
    "InvalidEventError",
    "NotInstalledError",
    "Outbox",
    "OutboxError",
    "PayloadNotSerializableError",
    "UnsupportedBindError",
    "install",
    "new_event_id",
    "write",
    "write_async",
]
