"""Operator queries: what the CLI's `status`, `dead ...`, `purge` and `health` commands run.

Every statement is SQLAlchemy Core and dialect-neutral (PostgreSQL and SQLite). Reads are one
query each; repairs touching many rows work in bounded batches (`batch_size` rows per
transaction) in write order, so a requeue or purge of a million dead letters never holds a
long transaction, and report progress through a callback. A repair that names events by id is
all or nothing: one unknown or non-dead id and nothing changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from outbox.ddl import SchemaCheck, SchemaReport
from outbox.ddl import check as schema_check
from outbox.schema import DEAD, NEVER_SERVED, PENDING, PUBLISHED, Outbox
from relay.admin_records import (
    ActiveRelay,
    DeadLetter,
    EventDetail,
    FailureRecord,
    OutboxGauges,
    OutboxStatus,
    Plan,
    Selector,
    as_utc,
)
from relay.errors import ConfigError, NotFoundError, RelayError, SchemaMissingError
from relay.store import translate_db_error

BATCH_SIZE = 1000
ACTIVE_RELAY_WINDOW = 30.0
"""A relay whose heartbeat is older than this many seconds is not listed as active."""

Progress = Callable[[int], None]
"""Called after each committed batch with the number of rows it changed."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the queries -------------------------------------------------------------------------------


class Admin:
    """Operator queries on one outbox. `engine` may be shared with a running relay."""

    def __init__(self, engine: sa.Engine, outbox: Outbox, *, batch_size: int = BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be 1 or more, got {batch_size}")
        self.engine = engine
        self.outbox = outbox
        self.batch_size = batch_size
        self._postgres = engine.dialect.name == "postgresql"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:
            error = translate_db_error(exc)
            if isinstance(error, RelayError):
                raise error from exc
            raise

    def create_tables(self) -> SchemaReport:
        """Create what is missing of the outbox (tables, indexes, triggers), or upgrade an
        outbox of an earlier version in place; idempotent. Returns what changed."""
        try:
            return self.outbox.create(self.engine)
        except sa.exc.DBAPIError as exc:
            error = translate_db_error(exc)
            if isinstance(error, RelayError):
                raise error from exc
            raise

    def check(self) -> SchemaCheck:
        """Raise unless the database answers and the outbox tables exist; report what is
        missing or off (an older schema, a missing trigger, a cached sequence)."""
        with self._transaction() as conn:
            result = schema_check(self.outbox, conn)
        if result.tables_missing:
            raise SchemaMissingError(result.errors[0])
        return result

    # -- reads ---------------------------------------------------------------------------------

    def gauges(self, now: dt.datetime | None = None) -> OutboxGauges:
        """Pending and dead counts, the oldest pending event's age, held keys and live relays.
        They read the partial indexes of pending and dead rows, never the published rows: the
        oldest pending event is the oldest of the keys' heads (one index probe per key with
        pending events). Held keys and relays come from the small key and relay tables."""
        now = now or utcnow()
        t, k, r = self.outbox.events, self.outbox.keys, self.outbox.relays
        pending = sa.select(sa.func.count()).where(t.c.status == PENDING).scalar_subquery()
        dead = sa.select(sa.func.count()).where(t.c.status == DEAD).scalar_subquery()
        held = sa.select(sa.func.count()).where(k.c.held).scalar_subquery()
        alive = (
            sa.select(sa.func.count())
            .where(r.c.heartbeat_at >= now - dt.timedelta(seconds=ACTIVE_RELAY_WINDOW))
            .scalar_subquery()
        )
        with self._transaction() as conn:
            row = conn.execute(sa.select(pending, dead, held, alive)).one()
            oldest = self._oldest_pending(conn)
        return OutboxGauges(
            pending=row[0],
            dead=row[1],
            oldest_pending_age=_age(now, oldest),
            held_keys=row[2],
            active_relays=row[3],
        )

    def _oldest_pending(self, conn: Connection) -> Any:
        """The oldest of every key's first pending event and the first event without a key.

        Each key's head is read for its key row (correlated: uncorrelated, the subquery
        joined both tables and read the lowest-seq row of any key, which is not the oldest
        head when writers set `occurred_at`), as the claim reads it: the key as a range,
        ordered by (key, seq), which only the index of pending rows by key gives."""
        t, k = self.outbox.events, self.outbox.keys
        key_head = (
            sa.select(t.c.occurred_at)
            .where(t.c.key >= k.c.key, t.c.key <= k.c.key, t.c.status == PENDING)
            .order_by(t.c.key, t.c.seq)
            .limit(1)
            .correlate(k)
            .scalar_subquery()
        )
        keyless_head = (
            sa.select(t.c.occurred_at)
            .where(t.c.key.is_(None), t.c.status == PENDING)
            .order_by(t.c.seq)
            .limit(1)
            .scalar_subquery()
        )
        heads = conn.execute(
            sa.select(
                sa.select(sa.func.min(key_head)).select_from(k).scalar_subquery(),
                keyless_head,
            )
        ).one()
        moments = [moment for value in heads if (moment := as_utc(_datetime(value))) is not None]
        return min(moments, default=None)

    def status(self, now: dt.datetime | None = None) -> OutboxStatus:
        now = now or utcnow()
        t, k = self.outbox.events, self.outbox.keys
        pending = t.c.status == PENDING
        key_leased = sa.and_(k.c.lease_token.is_not(None), k.c.available_at > now)
        key_waiting = sa.and_(k.c.lease_token.is_(None), ~k.c.held, k.c.available_at > now)
        row_leased = sa.and_(t.c.key.is_(None), t.c.lease_until > now)
        row_waiting = sa.and_(
            t.c.key.is_(None),
            sa.or_(t.c.lease_until.is_(None), t.c.lease_until <= now),
            t.c.next_attempt_at > now,
        )
        of_leased_key = sa.exists().where(k.c.key == t.c.key, key_leased)
        counts = sa.select(
            sa.func.count().filter(pending),
            sa.func.count().filter(pending, sa.or_(row_leased, of_leased_key)),
            sa.func.count().filter(pending, row_waiting),
            sa.func.count().filter(t.c.status == DEAD),
            sa.func.count().filter(t.c.status == PUBLISHED),
            sa.func.min(t.c.occurred_at).filter(pending),
        )
        later = t.alias("later")
        behind_head = (
            sa.select(sa.func.count())
            .select_from(
                sa.select(later.c.seq)
                .where(later.c.key == k.c.key, later.c.status == PENDING)
                .limit(2)
                .subquery()
            )
            .scalar_subquery()
        )
        any_pending = sa.exists().where(later.c.key == k.c.key, later.c.status == PENDING)
        keys = sa.select(
            sa.func.count().filter(key_waiting),
            sa.func.count().filter(
                sa.or_(sa.and_(k.c.held, any_pending), sa.and_(key_waiting, behind_head > 1))
            ),
        )
        r = self.outbox.relays
        relays = (
            sa.select(r)
            .where(r.c.heartbeat_at >= now - dt.timedelta(seconds=ACTIVE_RELAY_WINDOW))
            .order_by(r.c.name)
        )
        with self._transaction() as conn:
            schema = schema_check(self.outbox, conn)
            row = conn.execute(counts).one()
            keys_waiting, keys_held = conn.execute(keys).one()
            active = conn.execute(relays).mappings().all()
        return OutboxStatus(
            table=self.outbox.qualified_name,
            checked_at=now,
            pending=row[0],
            in_flight=row[1],
            waiting_retry=row[2] + keys_waiting,
            dead=row[3],
            published=row[4],
            oldest_pending_age=_age(now, row[5]),
            keys_held_back=keys_held,
            relays=tuple(
                ActiveRelay(
                    name=a["name"],
                    host=a["host"],
                    pid=a["pid"],
                    started_at=a["started_at"],
                    heartbeat_at=a["heartbeat_at"],
                    broker_node=a["broker_node"],
                )
                for a in active
            ),
            schema_problems=schema.errors + schema.warnings,
        )

    def dead_letters(self, selector: Selector | None = None, *, limit: int) -> list[DeadLetter]:
        """Dead letters in write order (the order they would be published again)."""
        t, f = self.outbox.events, self.outbox.failures
        last_failed = (
            sa.select(sa.func.max(f.c.failed_at))
            .where(f.c.event_id == t.c.id)
            .scalar_subquery()
            .label("last_failed_at")
        )
        query = (
            sa.select(
                t.c.seq,
                t.c.id,
                t.c.type,
                t.c.key,
                t.c.routing_key,
                t.c.attempts,
                t.c.last_error,
                t.c.occurred_at,
                last_failed,
            )
            .where(*self._dead_filters(selector))
            .order_by(t.c.seq)
            .limit(limit)
        )
        with self._transaction() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            DeadLetter(
                seq=row["seq"],
                id=row["id"],
                type=row["type"],
                key=row["key"],
                routing_key=row["routing_key"],
                attempts=row["attempts"],
                last_error=row["last_error"],
                occurred_at=row["occurred_at"],
                last_failed_at=_datetime(row["last_failed_at"]),
            )
            for row in rows
        ]

    def event(self, event_id: uuid.UUID) -> EventDetail:
        """One event in full (whatever its status) with its failure history."""
        t, f = self.outbox.events, self.outbox.failures
        with self._transaction() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == event_id)).mappings().first()
            if row is None:
                raise NotFoundError(
                    f"event {event_id} does not exist (outbox table {self.outbox.qualified_name})"
                )
            failures = conn.execute(
                sa.select(f).where(f.c.event_id == event_id).order_by(f.c.failed_at, f.c.id)
            ).mappings()
            history = tuple(
                FailureRecord(
                    attempt=h["attempt"],
                    failed_at=h["failed_at"],
                    relay=h["relay"],
                    error=h["error"],
                )
                for h in failures
            )
        return EventDetail(row=dict(row), failures=history)

    def plan(self, selector: Selector) -> Plan:
        """Count what `selector` names; for ids, raise NotFoundError unless every one is dead."""
        t = self.outbox.events
        with self._transaction() as conn:
            if selector.ids:
                rows = self._check_ids(conn, selector.ids, lock=False)
                return Plan(
                    selector=selector,
                    count=len(rows),
                    keys=len({row.key for row in rows if row.key is not None}),
                    last_seq=max(row.seq for row in rows),
                )
            row = conn.execute(
                sa.select(
                    sa.func.count(), sa.func.count(sa.distinct(t.c.key)), sa.func.max(t.c.seq)
                ).where(*self._dead_filters(selector))
            ).one()
        return Plan(selector=selector, count=row[0], keys=row[1], last_seq=row[2])

    # -- repairs -------------------------------------------------------------------------------

    def requeue(self, plan: Plan, progress: Progress | None = None) -> int:
        """Make the planned dead letters pending again: same id, same seq (so the same place in
        their key's order), attempts 0, no retry time, no lease. Returns how many.

        Each batch takes its keys' advisory locks (as writers do) before it makes rows pending
        and makes sure their key rows exist, so a relay removing a drained key can never
        remove one that a requeue is filling again (see `relay.store`)."""
        t = self.outbox.events
        values = {
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": None,
            "claim_token": None,
            "claimed_by": None,
            "lease_until": None,
        }

        def apply(conn: Connection, rows: Sequence[Any]) -> int:
            seqs = [row.seq for row in rows]
            keys = sorted({row.key for row in rows if row.key is not None})
            self._lock_keys(conn, keys)
            changed = conn.execute(
                sa.update(t).where(t.c.seq.in_(seqs), t.c.status == DEAD).values(values)
            ).rowcount
            if keys:
                self._track_keys(conn, keys)
                self._release_holds(conn, keys)
            if self._postgres and changed:
                # The insert trigger is what normally wakes relays; an update does not fire it.
                conn.execute(sa.select(sa.func.pg_notify(self.outbox.channel, "")))
            return int(changed)

        return self._in_batches(plan, apply, progress)

    def purge_dead(self, plan: Plan, progress: Progress | None = None) -> int:
        """Delete the planned dead letters and their failure history. Returns how many."""
        t, f = self.outbox.events, self.outbox.failures

        def apply(conn: Connection, rows: Sequence[Any]) -> int:
            seqs = [row.seq for row in rows]
            ids = [row.id for row in rows]
            deleted = conn.execute(
                sa.delete(t).where(t.c.seq.in_(seqs), t.c.status == DEAD)
            ).rowcount
            conn.execute(sa.delete(f).where(f.c.event_id.in_(ids)))
            keys = sorted({row.key for row in rows if row.key is not None})
            if keys:
                self._release_holds(conn, keys)
            return int(deleted)

        return self._in_batches(plan, apply, progress)

    def _lock_keys(self, conn: Connection, keys: Sequence[str]) -> None:
        """Take the writers' per-key advisory locks, in key order (PostgreSQL)."""
        if not self._postgres or not keys:
            return
        for key in keys:
            conn.execute(
                sa.select(
                    sa.func.pg_advisory_xact_lock(
                        sa.func.hashtextextended(key, self.outbox.key_lock_seed)
                    )
                )
            )

    def _track_keys(self, conn: Connection, keys: Sequence[str]) -> None:
        """Make sure each key has its row (a drained key's row may be gone)."""
        k = self.outbox.keys
        insert = postgresql.insert(k) if self._postgres else sqlite.insert(k)
        conn.execute(
            insert.on_conflict_do_nothing(index_elements=["key"]),
            [{"key": key, "available_at": NEVER_SERVED, "held": False} for key in keys],
        )

    def _release_holds(self, conn: Connection, keys: Sequence[str]) -> None:
        """Keys held by a dead letter stop being held once no dead event of theirs is left."""
        t, k = self.outbox.events, self.outbox.keys
        dead_left = sa.exists().where(t.c.key == k.c.key, t.c.status == DEAD)
        conn.execute(sa.update(k).where(k.c.key.in_(keys), k.c.held, ~dead_left).values(held=False))

    def count_published(self, before: dt.datetime) -> int:
        t = self.outbox.events
        with self._transaction() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        t.c.status == PUBLISHED, t.c.published_at < before
                    )
                ).scalar_one()
            )

    def purge_published(self, before: dt.datetime, progress: Progress | None = None) -> int:
        """Delete rows published before `before` (and any failure history), in batches."""
        t, f = self.outbox.events, self.outbox.failures
        total = 0
        while True:
            with self._transaction() as conn:
                rows = conn.execute(
                    sa.select(t.c.seq, t.c.id)
                    .where(t.c.status == PUBLISHED, t.c.published_at < before)
                    .order_by(t.c.seq)
                    .limit(self.batch_size)
                ).all()
                if not rows:
                    break
                deleted = conn.execute(
                    sa.delete(t).where(
                        t.c.seq.in_([row.seq for row in rows]), t.c.status == PUBLISHED
                    )
                ).rowcount
                conn.execute(sa.delete(f).where(f.c.event_id.in_([row.id for row in rows])))
            total += int(deleted)
            if progress is not None:
                progress(int(deleted))
            if len(rows) < self.batch_size:
                break
        return total

    # -- helpers -------------------------------------------------------------------------------

    def _dead_filters(self, selector: Selector | None) -> list[sa.ColumnElement[bool]]:
        t, f = self.outbox.events, self.outbox.failures
        conditions: list[sa.ColumnElement[bool]] = [t.c.status == DEAD]
        if selector is None:
            return conditions
        if selector.ids:
            conditions.append(t.c.id.in_(selector.ids))
        if selector.type is not None:
            conditions.append(t.c.type == selector.type)
        if selector.key is not None:
            conditions.append(t.c.key == selector.key)
        if selector.since is not None:
            conditions.append(
                sa.exists().where(f.c.event_id == t.c.id, f.c.failed_at >= selector.since)
            )
        return conditions

    def _check_ids(self, conn: Connection, ids: Sequence[uuid.UUID], *, lock: bool) -> list[Any]:
        t = self.outbox.events
        query = sa.select(t.c.seq, t.c.id, t.c.key, t.c.status).where(t.c.id.in_(ids))
        if lock:
            query = query.order_by(t.c.seq).with_for_update()
        rows = conn.execute(query).all()
        found = {row.id: row for row in rows}
        problems = [f"event {i} does not exist" for i in ids if i not in found]
        problems += [
            f"event {row.id} is {row.status}, not dead" for row in rows if row.status != DEAD
        ]
        if problems:
            raise NotFoundError("; ".join(problems) + ": nothing was changed")
        return sorted(rows, key=lambda row: row.seq)

    def _in_batches(
        self,
        plan: Plan,
        apply: Callable[[Connection, Sequence[Any]], int],
        progress: Progress | None,
    ) -> int:
        t = self.outbox.events
        if plan.count == 0 or plan.last_seq is None:
            return 0
        if plan.selector.ids:
            # Named rows: all or nothing, in one transaction, checked again under a row lock.
            with self._transaction() as conn:
                rows: Sequence[Any] = self._check_ids(conn, plan.selector.ids, lock=True)
                done = apply(conn, rows)
            if progress is not None:
                progress(done)
            return done
        total, after = 0, None
        while True:
            conditions = [*self._dead_filters(plan.selector), t.c.seq <= plan.last_seq]
            if after is not None:
                # Walk forward in write order: a row that dies again meanwhile is not revisited.
                conditions.append(t.c.seq > after)
            with self._transaction() as conn:
                rows = conn.execute(
                    sa.select(t.c.seq, t.c.id, t.c.key)
                    .where(*conditions)
                    .order_by(t.c.seq)
                    .limit(self.batch_size)
                ).all()
                if not rows:
                    break
                done = apply(conn, rows)
            total += done
            after = rows[-1].seq
            if progress is not None:
                progress(done)
            if len(rows) < self.batch_size:
                break
        return total


def _datetime(value: Any) -> dt.datetime | None:
    """A scalar subquery loses the column type on SQLite, which then returns text."""
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def _age(now: dt.datetime, oldest: Any) -> float | None:
    moment = as_utc(_datetime(oldest))
    if moment is None:
        return None
    return max(0.0, (now - moment).total_seconds())
