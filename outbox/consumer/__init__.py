"""The consumer side: handlers that apply each event once, in per-key order, across versions.

    from outbox.consumer import Handlers, Inbox

    handlers = Handlers("billing", events, inbox=Inbox(Base.metadata))

    @handlers.on(OrderPlaced)
    def charge(event: OrderPlaced, session: Session) -> None: ...

Run it with `outbox-relay consume myapp.handlers:handlers`, or in-process with
`relay.consumer` (a step-testable loop). `outbox.consumer.testing` runs handlers in tests.
"""

from outbox.consumer.errors import (
    ConsumerError,
    HandlerRegistrationError,
    InboxUnavailableError,
    ParkedMessageNotFoundError,
)
from outbox.consumer.handlers import Handlers, Subscription
from outbox.consumer.message import Message
from outbox.consumer.processor import Outcome, Processor, Result, RetryPolicy
from outbox.consumer.schema import Inbox, ParkedMessage

__all__ = [
    "ConsumerError",
    "HandlerRegistrationError",
    "Handlers",
    "Inbox",
    "InboxUnavailableError",
    "Message",
    "Outcome",
    "ParkedMessage",
    "ParkedMessageNotFoundError",
    "Processor",
    "Result",
    "RetryPolicy",
    "Subscription",
]
