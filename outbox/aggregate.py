"""Aggregates record events; a session hook saves them when the session flushes.

    class Order(Base, AggregateRoot):
        __aggregate_type__ = "order"
        def place(self): self.record("order.placed", {"total": "9.99"})

    outbox.install(SessionFactory)      # once, at start-up

Recorded events are written in the same flush (and so the same transaction) as the aggregate's
own rows, after its primary key is known, so the default ordering key is
"order:<id>" even for a new order. Rolling back forgets them: they are never saved by a later
transaction by accident.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, object_session, sessionmaker
from sqlalchemy.orm.attributes import flag_dirty

from outbox.domain import record_args
from outbox.errors import OutboxError
from outbox.event import Event
from outbox.schema import Outbox
from outbox.writer import DEFAULT_OUTBOX, event_rows, insert_rows

_PENDING_ATTR = "_outbox_pending_events"
_SEEN_KEY = "outbox.aggregates"
_HOOKS_KEY = "outbox.hooks"


class AggregateRoot:
    """Mixin for aggregates (usually ORM-mapped classes) that record domain events.

    `__aggregate_type__` names the aggregate on the wire; it defaults to the class name in
    lower case. The aggregate id is its primary key (joined with ":" when composite).
    """

    __aggregate_type__: ClassVar[str | None] = None

    def record(self, event: Event | str, payload: Any = None, **fields: Any) -> Event:
        """Record an event (an `Event`, or a type plus payload and Event fields)."""
        event, payload, fields = record_args(event, payload, fields)  # typed domain events
        if isinstance(event, str):
            fields.setdefault("aggregate_type", self.aggregate_type())
            if "key" not in fields and "aggregate_id" not in fields:
                # A new aggregate has no id yet: the flush fills it in, and the key with it.
                fields["aggregate_id"] = self.aggregate_id()
            event = Event(type=event, payload=payload, **fields)
        elif payload is not None or fields:
            raise OutboxError("record(Event) takes no payload or fields: set them on the Event")
        if not isinstance(event, Event):
            raise OutboxError(f"record() takes an Event or a type, got {type(event).__name__}")
        self.__dict__.setdefault(_PENDING_ATTR, []).append(event)
        if object_session(self) is not None:
            # An aggregate whose columns did not change would be skipped by the flush, and
            # its events with it: flag it so the flush (and our hook) sees it. No UPDATE runs.
            flag_dirty(self)
        return event

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """Events recorded and not yet saved (flushed) nor discarded (rolled back)."""
        return tuple(self.__dict__.get(_PENDING_ATTR, ()))

    def aggregate_type(self) -> str:
        return self.__aggregate_type__ or type(self).__name__.lower()

    def aggregate_id(self) -> str | None:
        """The primary key as text, or None while the database has not assigned it."""
        # Read the columns, not `inspect(self).identity`: inside after_flush the identity is
        # not set yet although the INSERT has filled the key.
        identity = sa.inspect(self).mapper.primary_key_from_instance(self)
        if not identity or any(part is None for part in identity):
            return None
        return ":".join(str(part) for part in identity)

    def _outbox_take_events(self) -> list[Event]:
        events: list[Event] = self.__dict__.pop(_PENDING_ATTR, [])
        return events

    def _outbox_discard_events(self) -> None:
        self.__dict__.pop(_PENDING_ATTR, None)


def install(
    target: Session | sessionmaker[Any] | type[Session] | AsyncSession | async_sessionmaker[Any],
    *,
    outbox: Outbox = DEFAULT_OUTBOX,
) -> None:
    """Save the events of aggregates whenever a session of `target` flushes. Idempotent.

    `target` is a session, a sessionmaker, a Session subclass (every session of that class),
    an AsyncSession or an async_sessionmaker.
    """
    target = _sync_target(target)
    hooks = _Hooks(outbox)
    installed: dict[int, _Hooks] = _installed_hooks(target)
    if id(outbox) in installed:
        return
    installed[id(outbox)] = hooks
    sa_event.listen(target, "before_flush", hooks.before_flush)
    sa_event.listen(target, "after_flush", hooks.after_flush)
    sa_event.listen(target, "after_soft_rollback", hooks.after_soft_rollback)
    sa_event.listen(target, "after_commit", hooks.after_commit)


def _sync_target(target: Any) -> Any:
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, async_sessionmaker):
        # Events attach to the sync Session class behind the AsyncSession; give this factory
        # a class of its own so that other factories are not affected.
        base = target.kw.get("sync_session_class", Session)
        if not getattr(base, "_outbox_dedicated", False):
            base = type(f"Outbox{base.__name__}", (base,), {"_outbox_dedicated": True})
            target.kw["sync_session_class"] = base
        return base
    if isinstance(target, Session | sessionmaker) or (
        isinstance(target, type) and issubclass(target, Session)
    ):
        return target
    raise OutboxError(
        f"install() takes a Session, sessionmaker, Session subclass, AsyncSession or "
        f"async_sessionmaker, got {type(target).__name__}"
    )


def _installed_hooks(target: Any) -> dict[int, _Hooks]:
    registry = target.__dict__.get("_outbox_hooks") if isinstance(target, type) else None
    if isinstance(target, type):
        if registry is None:
            registry = {}
            setattr(target, "_outbox_hooks", registry)  # noqa: B010 - class attribute we own
        return registry
    if isinstance(target, Session):
        return target.info.setdefault(_HOOKS_KEY, {})  # type: ignore[no-any-return]
    # sessionmaker: its `kw["info"]` would be shared with sessions; keep our own attribute.
    if not hasattr(target, "_outbox_hooks"):
        target._outbox_hooks = {}
    return target._outbox_hooks  # type: ignore[no-any-return]


class _Hooks:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        # Deleted objects leave the identity map during the flush: note them now.
        seen = session.info.setdefault(_SEEN_KEY, weakref.WeakSet())
        for obj in (*session.new, *session.dirty, *session.deleted, *session.identity_map.values()):
            if isinstance(obj, AggregateRoot) and obj.pending_events:
                seen.add(obj)

    def after_flush(self, session: Session, flush_context: Any) -> None:
        seen = session.info.get(_SEEN_KEY)
        if not seen:
            return
        events: list[Event] = []
        for aggregate in list(seen):
            taken = aggregate._outbox_take_events()
            aggregate_id = aggregate.aggregate_id()
            for event in taken:
                if event.aggregate_id is None and event.key is None and aggregate_id:
                    event = event.with_aggregate(
                        event.aggregate_type or aggregate.aggregate_type(), aggregate_id
                    )
                events.append(event)
        seen.clear()
        # UUIDv7 ids grow with time: sorting keeps the order in which events were recorded
        # across aggregates.
        events.sort(key=lambda e: e.id)
        rows = event_rows(events)
        insert_rows(
            session.connection(bind_arguments={"clause": self.outbox.events}), self.outbox, rows
        )

    def after_soft_rollback(self, session: Session, previous_transaction: Any) -> None:
        seen = session.info.pop(_SEEN_KEY, None) or ()
        for obj in (*seen, *session.new, *session.identity_map.values()):
            if isinstance(obj, AggregateRoot):
                obj._outbox_discard_events()

    def after_commit(self, session: Session) -> None:
        session.info.pop(_SEEN_KEY, None)
