"""Typed domain events: frozen dataclasses registered under a type name and a version.

    events = DomainEvents()                      # one registry per application, no global state

    @events.event("order.placed", version=2, key=lambda e: f"order:{e.order_id}")
    @dataclass(frozen=True)
    class OrderPlaced:
        order_id: int
        total: Decimal

    @events.upcaster("order.placed", from_version=1)
    def _v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "total": payload.pop("amount")}

`outbox.write(session, OrderPlaced(...))` and `aggregate.record(OrderPlaced(...))` take such an
instance directly: the type, the version and the payload come from it. A consumer turns a
payload back into the class with `events.decode(type, version, payload)`, after chaining the
upcasters from the payload's version to the class's. Decoding is a tolerant reader: fields the
class does not declare are ignored, fields it declares with a default may be missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from outbox.decoding import PayloadDecodeError, decode_dataclass, kind_of
from outbox.errors import InvalidEventError, OutboxError
from outbox.event import Event

T = TypeVar("T")
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
KeyOf = Callable[[Any], str | None]

_SPEC_ATTR = "__outbox_event__"


class DomainEventError(OutboxError):
    """A domain event class, registration or payload is not usable; the message says why."""


class UnknownEventTypeError(DomainEventError):
    """No class is registered under the event's type name."""


class UnknownEventVersionError(DomainEventError):
    """The payload's version is newer than the registered class, or an upcaster is missing."""


@dataclasses.dataclass(frozen=True)
class EventSpec:
    """How one dataclass maps to the wire: its type name, current version and ordering key."""

    cls: type[Any]
    type: str
    version: int
    key_of: KeyOf | None = None

    def to_event(self, instance: Any, **fields: Any) -> Event:
        if self.key_of is not None and "key" not in fields:
            fields["key"] = self.key_of(instance)
        return Event(type=self.type, version=self.version, payload=instance, **fields)


def spec_of(value: Any) -> EventSpec | None:
    """The registration of a domain event instance or class, or None for anything else."""
    cls = value if isinstance(value, type) else type(value)
    spec = cls.__dict__.get(_SPEC_ATTR)
    return spec if isinstance(spec, EventSpec) else None


def as_event(value: Any) -> Any:
    """A registered domain event as an `Event`; anything else is returned unchanged.

    This is the writer's hook: `write()` passes every argument through it.
    """
    if isinstance(value, Event):
        return value
    spec = spec_of(value)
    if spec is not None:
        return spec.to_event(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        raise InvalidEventError(
            f"{type(value).__name__} is a dataclass but not a registered domain event: "
            f"decorate it with @events.event('type.name', version=N) (events = DomainEvents())"
        )
    return value


def record_args(
    event: Any, payload: Any, fields: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """The aggregate's hook: a domain event becomes `record(type, payload, **fields)`."""
    spec = spec_of(event) if not isinstance(event, str | Event) else None
    if spec is None:
        return event, payload, fields
    if payload is not None:
        raise DomainEventError(
            f"record({spec.cls.__name__}(...)) takes no payload: the instance is the payload"
        )
    fields = {"version": spec.version, **fields}
    if spec.key_of is not None and "key" not in fields:
        fields["key"] = spec.key_of(event)
    return spec.type, event, fields


class DomainEvents:
    """A registry of domain event classes and upcasters. Create one per application."""

    def __init__(self) -> None:
        self._specs: dict[str, EventSpec] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def event(
        self, type_name: str, *, version: int = 1, key: str | KeyOf | None = None
    ) -> Callable[[type[T]], type[T]]:
        """Register a frozen dataclass as the current version of event `type_name`.

        `key` gives the ordering key of each instance: an attribute name, or a function of the
        instance. Without it, `write()` sends the event without a key (never held back) and
        `record()` uses the aggregate's key.
        """
        Event(type=type_name, version=version)  # validates the name and the version
        key_of = _key_function(key)

        def register(cls: type[T]) -> type[T]:
            if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
                raise DomainEventError(
                    f"@event({type_name!r}) decorates a dataclass: put it above @dataclass"
                )
            if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                raise DomainEventError(
                    f"{cls.__name__} must be a frozen dataclass: events are facts, use "
                    "@dataclass(frozen=True)"
                )
            if spec_of(cls) is not None:
                raise DomainEventError(f"{cls.__name__} is already registered as an event")
            if type_name in self._specs:
                other = self._specs[type_name].cls.__name__
                raise DomainEventError(f"event type {type_name!r} is already {other}")
            spec = EventSpec(cls=cls, type=type_name, version=version, key_of=key_of)
            setattr(cls, _SPEC_ATTR, spec)
            self._specs[type_name] = spec
            return cls

        return register

    def upcaster(self, type_name: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function that turns a version `from_version` payload into the next one."""
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise DomainEventError(f"from_version must be an int of 1 or more, not {from_version}")

        def register(function: Upcaster) -> Upcaster:
            if (type_name, from_version) in self._upcasters:
                raise DomainEventError(
                    f"{type_name!r} already has an upcaster from version {from_version}"
                )
            self._upcasters[type_name, from_version] = function
            return function

        return register

    def spec(self, type_name: str) -> EventSpec | None:
        return self._specs.get(type_name)

    def decode(self, type_name: str, version: int, payload: Any) -> Any:
        """The payload (decoded JSON) of a `type_name` event at `version`, as its class.

        Raises UnknownEventTypeError, UnknownEventVersionError or PayloadDecodeError, each
        saying what to fix.
        """
        spec = self._specs.get(type_name)
        if spec is None:
            raise UnknownEventTypeError(
                f"no class is registered for event type {type_name!r}: register one with "
                f"@events.event({type_name!r}, version={version})"
            )
        if version > spec.version:
            raise UnknownEventVersionError(
                f"{type_name} version {version} is newer than {spec.cls.__name__} (version "
                f"{spec.version}): deploy the consumer with the version {version} class, then "
                "retry the parked messages"
            )
        for step in range(version, spec.version):
            upcast = self._upcasters.get((type_name, step))
            if upcast is None:
                raise UnknownEventVersionError(
                    f"{type_name} version {step} cannot become version {step + 1}: register "
                    f"@events.upcaster({type_name!r}, from_version={step}), then retry the "
                    "parked messages"
                )
            if not isinstance(payload, dict):
                raise PayloadDecodeError(
                    f"{type_name} v{step} payload is {kind_of(payload)}, not an object"
                )
            try:
                payload = upcast(dict(payload))
            except Exception as exc:
                raise PayloadDecodeError(
                    f"the upcaster of {type_name} from version {step} failed: {exc!r}"
                ) from exc
        return decode_dataclass(spec.cls, payload, where=f"{type_name} v{spec.version}")


def _key_function(key: str | KeyOf | None) -> KeyOf | None:
    if key is None or callable(key):
        return key
    if isinstance(key, str):
        attribute = key

        def key_of(instance: Any) -> str | None:
            value = getattr(instance, attribute)
            return None if value is None else str(value)

        return key_of
    raise DomainEventError(f"key must be an attribute name or a function, not {key!r}")
