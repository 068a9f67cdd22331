"""Aggregates record events; a session hook saves them when the session flushes.

    class Order(Base, AggregateRoot):
        __aggregate_type__ = "order"
        def place(self): self.record("order.placed", {"total": "9.99"})

    outbox.install(SessionFactory)      # once, at start-up

Recorded events are written in the same flush (and so the same transaction) as the aggregate's
own rows, after its primary key is known, so the default ordering key is
"order:<id>" even for a new order. Rolling back forgets them: they are never saved by a later
transaction by accident.

Why events land in the order `record()` was called, across aggregates: every recorded event
takes a ticket from one counter (`itertools.count`, whose `next()` is atomic under the GIL), and
the flush writes the session's events sorted by ticket. Event ids are not used for this: callers
may choose their own (uuid4 idempotency ids sort randomly).

Why recorded events are never lost silently: a mapper hook on every `AggregateRoot` runs for
each aggregate a flush inserts, updates or deletes, in any session. If the aggregate has
recorded events and the session's `install()` hook did not take charge of them (in
`before_flush`, which runs first), the flush fails with `NotInstalledError` naming
`outbox.install`, before anything is committed.

With OpenTelemetry in use, each event stores the trace context current at `record()` (not at
the flush, which may run later, e.g. at a commit outside the span that did the work).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Mapper, Session, object_session, sessionmaker
from sqlalchemy.orm.attributes import flag_dirty

from outbox.domain import record_args
from outbox.errors import NotInstalledError, OutboxError
from outbox.event import Event
from outbox.schema import Outbox
from outbox.tracing import current_trace_headers, with_trace_headers
from outbox.writer import DEFAULT_OUTBOX, event_rows, insert_rows

_PENDING_ATTR = "_outbox_pending_events"
_SEEN_KEY = "outbox.aggregates"
_HOOKS_KEY = "outbox.hooks"
# Aggregates of a session with recorded events, held strongly: the session's identity map holds
# an unchanged (or expired) object only weakly, and its events would go with it.
_RECORDED_KEY = "outbox.recorded"

if TYPE_CHECKING:
    # Imported lazily at run time: sqlalchemy.ext.asyncio needs greenlet (the `asyncio` extra).
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

_tickets = itertools.count()
"""Orders recorded events across aggregates (see the module docstring)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Recorded:
    ticket: int
    event: Event
    # Set when the event is to be attributed to its aggregate at flush (its id was not known).
    attribute_to: str | None = None
    trace: Mapping[str, str] = dataclasses.field(default_factory=dict)  # see the docstring


class AggregateRoot:
    """Mixin for aggregates (usually ORM-mapped classes) that record domain events.

    `__aggregate_type__` names the aggregate on the wire; it defaults to the class name in
    lower case. The aggregate id is its primary key (joined with ":" when composite).
    """

    __aggregate_type__: ClassVar[str | None] = None

    def record(self, event: Event | str, payload: Any = None, **fields: Any) -> Event:
        """Record an event (an `Event`, or a type plus payload and Event fields).

        The event names this aggregate (`aggregate_type`, `aggregate_id`, and so the default
        key). For an aggregate the database has not given an id yet, the returned event has
        no aggregate fields; the flush fills them in (same event id) before writing it.
        """
        event, payload, fields = record_args(event, payload, fields)  # typed domain events
        attribute_to: str | None = None
        if isinstance(event, str):
            aggregate_type = fields.pop("aggregate_type", None) or self.aggregate_type()
            aggregate_id = fields.pop("aggregate_id", None)
            if aggregate_id is None:
                aggregate_id = self.aggregate_id()
            if aggregate_id is None:
                attribute_to = aggregate_type  # a new aggregate: the flush fills the id in
            else:
                fields.update(aggregate_type=aggregate_type, aggregate_id=aggregate_id)
            event = Event(type=event, payload=payload, **fields)
        elif payload is not None or fields:
            raise OutboxError("record(Event) takes no payload or fields: set them on the Event")
        elif not isinstance(event, Event):
            raise OutboxError(f"record() takes an Event or a type, got {type(event).__name__}")
        elif event.aggregate_type is None and event.key is None:
            attribute_to = self.aggregate_type()
        recorded = _Recorded(next(_tickets), event, attribute_to, current_trace_headers())
        self.__dict__.setdefault(_PENDING_ATTR, []).append(recorded)
        session = object_session(self)
        if session is not None:
            # An aggregate whose columns did not change would be skipped by the flush, and
            # its events with it: flag it so the flush (and our hook) sees it. No UPDATE runs.
            flag_dirty(self)
            _hold(session, self)
        return event

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """Events recorded and not yet saved (flushed) nor discarded (rolled back)."""
        return tuple(r.event for r in self.__dict__.get(_PENDING_ATTR, ()))

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

    def _outbox_take_events(self) -> list[tuple[int, Event]]:
        """The recorded events with their tickets, attributed to this aggregate; forgets them."""
        recorded: list[_Recorded] = self.__dict__.pop(_PENDING_ATTR, [])
        aggregate_id = self.aggregate_id()
        taken = []
        for r in recorded:
            event = r.event
            if r.attribute_to is not None and aggregate_id is not None:
                event = event.with_aggregate(r.attribute_to, aggregate_id)
            taken.append((r.ticket, with_trace_headers(event, r.trace)))
        return taken

    def _outbox_discard_events(self) -> None:
        self.__dict__.pop(_PENDING_ATTR, None)


def _refuse_uncovered(mapper: Mapper[Any], connection: Any, target: AggregateRoot) -> None:
    """Mapper hook (insert, update, delete): an aggregate with recorded events is being flushed
    by a session whose `install()` hook did not take its events: fail rather than lose them."""
    if not target.__dict__.get(_PENDING_ATTR):
        return
    session = object_session(target)
    seen = session.info.get(_SEEN_KEY, ()) if session is not None else ()
    if target in seen:
        return
    count = len(target.__dict__[_PENDING_ATTR])
    raise NotInstalledError(
        f"{type(target).__name__} recorded {count} event(s), but the session flushing it is "
        "not covered by outbox.install(), so they would be lost: call "
        "outbox.install(your_sessionmaker, outbox=...) once at start-up (it covers every "
        "session of that sessionmaker), or install(session) for this session"
    )


for _operation in ("before_insert", "before_update", "before_delete"):
    sa_event.listen(AggregateRoot, _operation, _refuse_uncovered, propagate=True)


def _hold(session: Session, aggregate: AggregateRoot) -> None:
    session.info.setdefault(_RECORDED_KEY, set()).add(aggregate)


def _held(session: Session) -> set[AggregateRoot]:
    held: set[AggregateRoot] = session.info.get(_RECORDED_KEY, set())
    return held


def _on_attach(session: Session, instance: Any) -> None:
    """An aggregate that recorded events while detached, added to a session."""
    if isinstance(instance, AggregateRoot) and instance.__dict__.get(_PENDING_ATTR):
        _hold(session, instance)


def _flush_recorded(session: Session) -> None:
    """Before any commit: an aggregate with recorded events that the flush would skip
    (expired or refreshed after `record()`, recorded while detached and added back) is flagged
    and flushed, so that its events are written (installed session) or refused (not
    installed), never left behind while its transaction commits."""
    waiting = [
        obj
        for obj in {*_held(session), *session.new, *session.identity_map.values()}
        if isinstance(obj, AggregateRoot) and obj.__dict__.get(_PENDING_ATTR)
    ]
    for obj in waiting:
        if obj in session and obj not in session.new:
            flag_dirty(obj)
    if waiting:
        session.flush()
    session.info.pop(_RECORDED_KEY, None)


def _forget_held(session: Session, previous_transaction: Any) -> None:
    session.info.pop(_RECORDED_KEY, None)


sa_event.listen(Session, "before_commit", _flush_recorded)
sa_event.listen(Session, "after_attach", _on_attach)
sa_event.listen(Session, "after_soft_rollback", _forget_held)


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
    # An AsyncSession or async_sessionmaker exists only once its module was imported.
    asyncio = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio is not None and isinstance(target, asyncio.AsyncSession):
        return target.sync_session
    if asyncio is not None and isinstance(target, asyncio.async_sessionmaker):
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
        taken: list[tuple[int, Event]] = []
        for aggregate in list(seen):
            taken.extend(aggregate._outbox_take_events())
        seen.clear()
        taken.sort(key=lambda ticket_event: ticket_event[0])  # record() order
        rows = event_rows((event for _, event in taken), trace={})  # traced at record()
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
