"""The relay's database side: every statement the relay loop runs against the outbox.

Concurrency model. Claims are serialised by a transaction-scoped advisory lock (PostgreSQL;
SQLite serialises writers anyway), so each claim sees every lease committed before it. A claim
leases *runs*: for each ordering key, its oldest pending rows in write order, skipping keys that
have a row leased by any relay, waiting for a retry, or (if dead letters hold their key) dead.
Every later write about a claimed row is fenced by the claim's token: a relay that lost its
lease (it paused past the lease, another relay took over) changes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from outbox.schema import DEAD, PENDING, PUBLISHED, Outbox
from relay.deadline import Watchdog
from relay.errors import DatabaseUnavailableError, SchemaMissingError
from relay.records import Claim, ClaimedEvent, Failure
from relay.urls import mask_text

log = logging.getLogger("relay.store")

# The claim walks pending rows in windows of max(2 x batch, MIN_WINDOW) rows, at most
# WINDOWS_PER_CLAIM of them: its cost is bounded whatever the backlog.
MIN_WINDOW = 1000
WINDOWS_PER_CLAIM = 4


def create_engine(
    url: str,
    *,
    application_name: str,
    db_timeout: float,
    idle_in_transaction_timeout: float | None = None,
) -> sa.Engine:
    """An engine for the relay: bounded waits, and a name operators can find in pg_stat_activity."""
    sa_url = sa.make_url(url)
    if sa_url.drivername in ("postgresql", "postgres"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    if sa_url.get_backend_name() == "postgresql":
        timeout_ms = int(db_timeout * 1000)
        # The relay's transactions are never idle for more than moments. One that is (its
        # relay froze mid-claim) holds the claim lock and stops every relay from claiming:
        # the server ends it after this long.
        idle_ms = int((idle_in_transaction_timeout or 2 * db_timeout) * 1000)
        return sa.create_engine(
            sa_url,
            pool_size=3,
            max_overflow=2,
            # No pre-ping round trip per transaction: a broken connection fails the call,
            # which the relay treats as an outage (it retries with backoff).
            connect_args={
                "application_name": application_name[:63],
                "connect_timeout": max(1, int(db_timeout)),
                # synchronous_commit=off: the relay's bookkeeping need not wait for the disk.
                # A server crash can forget the last moments of marks and leases; that only
                # makes those events go out again (same message_id), it never loses one.
                # The application's own transactions are not affected.
                # enable_bitmapscan=off: every row that leaves "pending" leaves a dead entry in
                # the pending index until vacuum comes by. A bitmap scan visits every one of
                # them, on every claim (measured: 3 ms instead of 0.1 ms for a claim of 20
                # rows after 20,000 were published); a plain index scan marks them dead the
                # first time and skips them from then on. The relay's queries all go by index.
                "options": f"-c statement_timeout={timeout_ms} "
                f"-c idle_in_transaction_session_timeout={idle_ms} "
                "-c synchronous_commit=off -c enable_bitmapscan=off",
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
        )
    return sa.create_engine(sa_url)


class Store:
    def __init__(
        self,
        engine: sa.Engine,
        outbox: Outbox,
        *,
        db_timeout: float,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.db_timeout = db_timeout
        self._watchdog = watchdog
        self._postgres = engine.dialect.name == "postgresql"
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.queries_total = 0
        sa.event.listen(engine, "before_cursor_execute", self._count_query)

    def _count_query(self, *args: Any) -> None:
        self.queries_total += 1

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction with a deadline; driver errors become RelayErrors."""
        try:
            # The deadline spans the COMMIT too: its answer can be lost like any other.
            with self.engine.connect() as conn, self._deadline(conn), conn.begin():
                yield conn
        except sa.exc.DBAPIError as exc:
            raise translate_db_error(exc) from exc

    def _execute_alone(self, statement: sa.Executable) -> sa.CursorResult[Any]:
        """A single statement in autocommit: one round trip, no BEGIN and COMMIT."""
        try:
            with self._autocommit.connect() as conn, self._deadline(conn):
                return conn.execute(statement)
        except sa.exc.DBAPIError as exc:
            raise translate_db_error(exc) from exc

    def _one_of(
        self, column: sa.ColumnElement[Any], values: Collection[Any]
    ) -> sa.ColumnElement[bool]:
        """`column IN values`. On PostgreSQL one array parameter, so the statement text (and
        its prepared plan) is the same whatever the number of values."""
        if self._postgres:
            array = postgresql.ARRAY(column.type)
            return column == sa.any_(sa.bindparam(None, list(values), type_=array))
        return column.in_(list(values))

    @contextlib.contextmanager
    def _deadline(self, conn: Connection) -> Iterator[None]:
        fd = _socket_fd(conn) if self._watchdog is not None and self._postgres else None
        if fd is None or self._watchdog is None:
            yield
            return
        with self._watchdog.guard(fd, self.db_timeout):
            yield

    # -- the claim -------------------------------------------------------------------------

    def claim(
        self,
        *,
        owner: str,
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
        now: dt.datetime,
        dead_letters_hold_key: bool,
    ) -> Claim:
        token = uuid.uuid4()
        t = self.outbox.events
        with self.transaction() as conn:
            if self._postgres:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(self.outbox.claim_lock_id)))
            chosen = self._choose(
                conn,
                limit=limit,
                run_length=run_length,
                now=now,
                dead_letters_hold_key=dead_letters_hold_key,
            )
            if not chosen:
                return Claim(token=token, events=(), lease_until=lease_until)
            rows = (
                conn.execute(
                    sa.update(t)
                    .where(t.c.seq.in_(chosen), t.c.status == PENDING)
                    .values(claim_token=token, claimed_by=owner, lease_until=lease_until)
                    .returning(*t.c)
                )
                .mappings()
                .all()
            )
        events = sorted((ClaimedEvent.from_row(row, token) for row in rows), key=lambda e: e.seq)
        return Claim(token=token, events=tuple(events), lease_until=lease_until)

    def _choose(
        self,
        conn: Connection,
        *,
        limit: int,
        run_length: int,
        now: dt.datetime,
        dead_letters_hold_key: bool,
    ) -> list[int]:
        """Walk pending rows in write order, window by window, and pick each free key's first
        rows (at most `run_length`) and keyless rows, up to `limit`.

        The walk is bounded in rows *visited*, not rows picked: rows of busy keys at the front
        of the table cost one window each, never a scan of the whole backlog.

        Why meeting a key's first pending row is enough to know whether the key is busy: the
        rows of a key that are leased or waiting for a retry are always its first pending rows.
        Leases are taken on a key's first rows and given back whole (the rest of a run is
        released with, or after, the row that stopped it), and a row waiting for a retry is
        its key's first pending row. So a key's rows are picked only from its head, as a
        prefix, and never while an earlier row of the key is out.
        """
        t = self.outbox.events
        held_by_dead: sa.ColumnElement[bool] = sa.false()
        if dead_letters_hold_key:
            dead_keys = sa.select(t.c.key).where(t.c.status == DEAD, t.c.key.is_not(None))
            held_by_dead = t.c.key.in_(dead_keys.scalar_subquery())
        held: set[str] = set()
        window = max(2 * limit, MIN_WINDOW)
        budget = window * WINDOWS_PER_CLAIM
        chosen: list[int] = []
        per_key: dict[str, int] = {}
        after = -1
        visited = 0
        while visited < budget and len(chosen) < limit:
            rows = conn.execute(
                sa.select(t.c.seq, t.c.key, self._free_and_due(now), held_by_dead)
                .where(t.c.status == PENDING, t.c.seq > after)
                .order_by(t.c.seq)
                .limit(window)
            ).all()
            for seq, key, ready, dead_ahead in rows:
                if key is not None and (dead_ahead or key in held):
                    continue
                if not ready:
                    if key is not None:
                        held.add(key)  # an unready row holds back the rest of its key
                    continue
                if key is not None:
                    taken = per_key.get(key, 0)
                    if taken >= run_length:
                        continue
                    per_key[key] = taken + 1
                chosen.append(seq)
                if len(chosen) >= limit:
                    break
            visited += len(rows)
            if len(rows) < window:
                break
            after = rows[-1][0]
        return chosen

    def _free_and_due(self, now: dt.datetime) -> sa.ColumnElement[bool]:
        """A row no relay holds a valid lease on, and not waiting for a retry."""
        t = self.outbox.events
        return sa.and_(
            sa.or_(t.c.lease_until.is_(None), t.c.lease_until <= now),
            sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at <= now),
        )

    def has_ready(self, now: dt.datetime) -> bool:
        """A cheap look before a claim: is any pending row due and not leased?"""
        t = self.outbox.events
        probe = (
            sa.select(t.c.seq)
            .where(t.c.status == PENDING, self._free_and_due(now))
            .order_by(t.c.seq)
            .limit(1)
        )
        return self._execute_alone(probe).first() is not None

    # -- results ---------------------------------------------------------------------------

    def mark_published(
        self, token: uuid.UUID, seqs: Collection[int], *, now: dt.datetime, delete: bool
    ) -> int:
        """Record confirmed rows; returns how many this claim still owned."""
        if not seqs:
            return 0
        t = self.outbox.events
        owned = [self._one_of(t.c.seq, seqs), t.c.claim_token == token]
        statement: sa.Delete | sa.Update
        if delete:
            statement = sa.delete(t).where(*owned)
        else:
            statement = (
                sa.update(t)
                .where(*owned)
                .values(
                    status=PUBLISHED,
                    published_at=now,
                    claim_token=None,
                    lease_until=None,
                    next_attempt_at=None,
                )
            )
        return int(self._execute_alone(statement).rowcount)

    def record_failures(
        self, token: uuid.UUID, failures: Sequence[Failure], *, relay: str, now: dt.datetime
    ) -> int:
        """Schedule each failed row's retry or make it dead, and keep the error history."""
        if not failures:
            return 0
        t = self.outbox.events
        by_seq = {f.event.seq: f for f in failures}
        with self.transaction() as conn:
            owned = conn.scalars(
                sa.select(t.c.seq)
                .where(t.c.seq.in_(list(by_seq)), t.c.claim_token == token)
                .with_for_update()
            ).all()
            mine = [by_seq[seq] for seq in owned]
            for failure in mine:
                conn.execute(
                    sa.update(t)
                    .where(t.c.seq == failure.event.seq)
                    .values(
                        status=PENDING if failure.next_attempt_at else DEAD,
                        attempts=failure.attempt,
                        next_attempt_at=failure.next_attempt_at,
                        last_error=failure.error,
                        claim_token=None,
                        lease_until=None,
                    )
                )
            if mine:
                conn.execute(
                    sa.insert(self.outbox.failures),
                    [
                        {
                            "event_id": f.event.id,
                            "attempt": f.attempt,
                            "failed_at": now,
                            "relay": relay,
                            "error": f.error,
                        }
                        for f in mine
                    ],
                )
        return len(mine)

    def release(self, token: uuid.UUID, seqs: Collection[int]) -> int:
        """Give rows back unattempted (connection lost, run cut short, graceful stop)."""
        if not seqs:
            return 0
        t = self.outbox.events
        statement = (
            sa.update(t)
            .where(self._one_of(t.c.seq, seqs), t.c.claim_token == token, t.c.status == PENDING)
            .values(claim_token=None, lease_until=None)
        )
        return int(self._execute_alone(statement).rowcount)

    def renew(self, tokens: Collection[uuid.UUID], lease_until: dt.datetime) -> set[uuid.UUID]:
        """Extend the leases of `tokens`; returns the tokens that still hold rows."""
        if not tokens:
            return set()
        t = self.outbox.events
        statement = (
            sa.update(t)
            .where(self._one_of(t.c.claim_token, tokens), t.c.status == PENDING)
            .values(lease_until=lease_until)
            .returning(t.c.claim_token)
        )
        return set(self._execute_alone(statement).scalars())

    # -- housekeeping ----------------------------------------------------------------------

    def purge_published(self, cutoff: dt.datetime, *, limit: int) -> int:
        """Delete up to `limit` rows published before `cutoff`, in one short transaction."""
        t = self.outbox.events
        f = self.outbox.failures
        batch = (
            sa.select(t.c.seq)
            .where(t.c.status == PUBLISHED, t.c.published_at < cutoff)
            .order_by(t.c.published_at)
            .limit(limit)
        )
        with self.transaction() as conn:
            ids = conn.scalars(
                sa.delete(t).where(t.c.seq.in_(batch.scalar_subquery())).returning(t.c.id)
            ).all()
            if ids:
                conn.execute(sa.delete(f).where(f.c.event_id.in_(ids)))
        return len(ids)

    def heartbeat(
        self, *, name: str, host: str, pid: int, started_at: dt.datetime, now: dt.datetime
    ) -> None:
        r = self.outbox.relays
        with self.transaction() as conn:
            updated = conn.execute(
                sa.update(r).where(r.c.name == name).values(heartbeat_at=now)
            ).rowcount
            if not updated:
                conn.execute(
                    sa.insert(r).values(
                        name=name, host=host, pid=pid, started_at=started_at, heartbeat_at=now
                    )
                )

    def unregister(self, name: str) -> None:
        r = self.outbox.relays
        with self.transaction() as conn:
            conn.execute(sa.delete(r).where(r.c.name == name))

    def close(self) -> None:
        """Stop the deadline watchdog and close pooled connections (the engine stays usable)."""
        if self._watchdog is not None:
            self._watchdog.stop()
        self.engine.dispose()

    def check(self) -> None:
        """Raise unless the database answers and the outbox table exists."""
        with self.transaction() as conn:
            conn.execute(sa.select(self.outbox.events.c.seq).limit(1))


def _socket_fd(conn: Connection) -> int | None:
    driver = conn.connection.dbapi_connection
    pgconn = getattr(driver, "pgconn", None)
    try:
        return int(pgconn.socket) if pgconn is not None else None
    except Exception:
        return None


def translate_db_error(exc: sa.exc.DBAPIError) -> Exception:
    text = mask_text(str(exc.orig) if exc.orig is not None else str(exc)).strip()
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate == "42P01" or "no such table" in text:
        return SchemaMissingError(
            f"the outbox tables are missing ({text.splitlines()[0]}): "
            "run `outbox-relay init-db` (or apply `outbox-relay init-db --sql`)"
        )
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
        exc.connection_invalidated
    ):
        return DatabaseUnavailableError(f"database unavailable: {text.splitlines()[0]}")
    return exc
