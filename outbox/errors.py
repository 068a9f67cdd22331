"""Errors raised by the outbox writer.

Every error here is raised *before* anything is sent to the database, so the caller's
transaction and session stay usable. Database errors (deadlocks, serialization failures,
a missing table) propagate exactly as SQLAlchemy raises them, so an application's own
transaction-retry logic keeps recognising them.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error the outbox writer raises."""


class InvalidEventError(OutboxError, ValueError):
    """An event is malformed: its message says which field and how to fix it."""


class PayloadNotSerializableError(InvalidEventError, TypeError):
    """An event payload or header value cannot be encoded as JSON."""


class UnsupportedBindError(OutboxError, TypeError):
    """`write()` was given something that is not a SQLAlchemy session or connection."""


class ClosedBindError(OutboxError):
    """`write()` was given a closed connection or session: the events would have nowhere to go."""


class NotInstalledError(OutboxError):
    """An aggregate with recorded events was flushed by a session `outbox.install()` does not
    cover: the flush fails instead of losing the events."""
