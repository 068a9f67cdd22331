"""Errors of the consumer side (handlers, inbox). Part of the `OutboxError` hierarchy."""

from __future__ import annotations

from outbox.errors import OutboxError


class ConsumerError(OutboxError):
    """Base class of the consumer side's errors."""


class HandlerRegistrationError(ConsumerError, ValueError):
    """A handler or a consumer name is not usable; the message says what to fix."""


class InboxUnavailableError(ConsumerError):
    """The database connection failed while a message was in hand: it is not acked, and the
    broker delivers it again once the consumer reconnects."""


class ParkedMessageNotFoundError(ConsumerError, LookupError):
    """An operator named a parked message or key that is not parked."""
