"""`Handlers`: which functions run for which events, for one named consumer group.

    handlers = Handlers("billing", events)         # events: the app's DomainEvents

    @handlers.on(OrderPlaced)
    def charge(event: OrderPlaced, session: Session) -> None: ...

    @handlers.on("order.archived")                 # an untyped event: gets the Message
    def archive(message: Message, session: Session) -> None: ...

Every consuming service is a group with a name of its own: its own queues and its own inbox
rows, so that several services receive the same events independently.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from outbox.consumer.errors import HandlerRegistrationError
from outbox.consumer.schema import Inbox
from outbox.domain import DomainEvents, spec_of

F = TypeVar("F", bound=Callable[..., Any])
HandlerFunction = Callable[[Any, Session], Any]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One handler for one event type; `typed` handlers get the decoded dataclass."""

    type: str
    function: HandlerFunction
    typed: bool

    @property
    def name(self) -> str:
        return f"{self.function.__module__}.{getattr(self.function, '__qualname__', '?')}"


class Handlers:
    """The handler registry of the consumer group `name`."""

    def __init__(
        self,
        name: str,
        events: DomainEvents | None = None,
        *,
        inbox: Inbox | None = None,
        routing_keys: Sequence[str] | None = None,
    ) -> None:
        """`routing_keys`: the patterns the group's queues are bound with on the relay's
        exchange; by default the event types it subscribes to, which is what the relay uses
        unless an event sets its own `routing_key`. Handlers are chosen by event type."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise HandlerRegistrationError(
                f"consumer name {name!r} must be 1 to 100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (it names queues and inbox rows)"
            )
        self.name = name
        self.events = events if events is not None else DomainEvents()
        self.inbox = inbox if inbox is not None else Inbox()
        self._subscriptions: dict[str, list[Subscription]] = {}
        if routing_keys is not None:
            if isinstance(routing_keys, str) or not all(
                isinstance(k, str) and k for k in routing_keys
            ):
                raise HandlerRegistrationError(
                    f"routing_keys must be a list of non-empty strings, got {routing_keys!r}"
                )
            if not routing_keys:
                raise HandlerRegistrationError("routing_keys must not be empty (or leave it out)")
        self._routing_keys = tuple(routing_keys) if routing_keys is not None else None

    def on(self, target: type[Any] | str) -> Callable[[F], F]:
        """Run the decorated `function(event, session)` for every `target` event.

        `target` is a domain event class registered in this group's `events`, or a type name
        for an untyped event (the function then gets the `Message`). Several handlers may
        subscribe to one event; they run in the order they were registered, in one
        transaction.
        """
        if isinstance(target, str):
            spec = self.events.spec(target)
            type_name, typed = target, False
            if spec is not None:
                raise HandlerRegistrationError(
                    f"{target!r} is registered as {spec.cls.__name__}: subscribe with "
                    f"@handlers.on({spec.cls.__name__}) to get decoded events"
                )
        else:
            spec = spec_of(target)
            if spec is None or self.events.spec(spec.type) is not spec:
                raise HandlerRegistrationError(
                    f"{getattr(target, '__name__', target)!r} is not an event class of this "
                    "consumer's DomainEvents: register it with @events.event(...) on the "
                    "registry passed to Handlers(name, events)"
                )
            type_name, typed = spec.type, True

        def register(function: F) -> F:
            if not callable(function):
                raise HandlerRegistrationError(f"handler {function!r} is not callable")
            self._subscriptions.setdefault(type_name, []).append(
                Subscription(type=type_name, function=function, typed=typed)
            )
            return function

        return register

    def for_type(self, type_name: str) -> tuple[Subscription, ...]:
        return tuple(self._subscriptions.get(type_name, ()))

    @property
    def types(self) -> tuple[str, ...]:
        """The event types this group subscribes to (its queues are bound to these)."""
        return tuple(sorted(self._subscriptions))

    @property
    def bindings(self) -> tuple[str, ...]:
        """Routing keys (patterns) the group's hash exchange is bound with."""
        return self._routing_keys if self._routing_keys is not None else self.types
