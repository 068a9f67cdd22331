"""The relay's database side: every statement the relay loop runs against the outbox.

Concurrency model. Relays claim *keys*, not rows: each ordering key with pending events has a
row in `<table>_key` holding its lease (owner, token, expiry), its retry time and whether a dead
event holds it. A claim locks ready key rows with `FOR UPDATE SKIP LOCKED`, so several relays
claim disjoint keys at the same time and never wait for each other, then reads each key's first
pending rows in write order. Events without a key keep no order and are leased row by row.
Every later write about a claimed event is fenced by the claim's token: a relay that lost its
lease (it paused past the lease, another relay took over) changes nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.sql.dml import ReturningDelete

from outbox.ddl import check as schema_check
from outbox.schema import DEAD, PENDING, PUBLISHED, Outbox
from relay.deadline import Watchdog
from relay.driver_sql import DriverStatement, PreparedOnServer, Progress, StepResult, run_script
from relay.errors import DatabaseUnavailableError, SchemaMissingError
from relay.records import CLAIMED_COLUMNS, Claim, ClaimedEvent, Failure
from relay.session_options import OPTIONS_ARRIVED, SessionCheck, joined, url_options
from relay.sql_literals import LiteralTemplate
from relay.urls import mask_text

log = logging.getLogger("relay.store")

# A claim's locked keys, for its read (`Store._lock_claim_keys`): a transaction-local
# setting of the claim's session (`_keep_in_setting`, `_read_from_setting`).
CLAIM_KEYS = "outbox_relay.claim_keys"
# The keys whose leases a result write ended and whose writers' locks it took, for its
# deletion of the drained ones (`Store._end_leases_noting_lockable`): likewise.
DRAINABLE_KEYS = "outbox_relay.drainable_keys"
# A script's first statement: each of its statements takes its own snapshot, which the
# claim and the writes of results rely on (see `_drop_empty_keys`), whatever default the
# database or role sets. (Also where the connection cannot carry options: PgBouncer.)
READ_COMMITTED = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"
BEGIN_READ_COMMITTED = "BEGIN ISOLATION LEVEL READ COMMITTED"
# The kept connections a claim uses (`Store._connection`): its script's, and the transaction
# that drops the keys it found empty.
CLAIM_ROLES = ("autocommit", "transactions")
# Between a claim and the write after it (`Store.claim_then_write`): commit the claim, chain
# the write's transaction to it (same isolation level) and make the server send the claim's
# answer now, with a notice, at a level no setting of the role's can suppress there.
ANSWER_NOW = (
    ("commit claim", "COMMIT AND CHAIN"),
    ("notices on", "SET LOCAL client_min_messages = notice"),
    ("answer now", "DO $$BEGIN RAISE NOTICE 'outbox relay: claim committed'; END$$"),
)


# Named statements of a script (`Store._script`), and the values of those that take any.
Script = tuple[list[tuple[str, str]], dict[str, dict[str, Any]]]
# A claim's locked keys and rows read, once it has committed (`Store._claim_postgres`).
Answered = Callable[[list[str], list[Any]], None]


@dataclasses.dataclass(frozen=True)
class FreedKeys:
    ended: int  # leases ended (the claims still held them)
    kept: int  # of those, keys not drained: they have pending events (or a writer)


NOTHING_FREED = FreedKeys(0, 0)


class Carried(NamedTuple):
    """Confirms and finished runs a claim writes, before it claims (`Store.write_and_claim`)
    or after (`Store.claim_then_write`): `mark_and_end_runs`'s arguments."""

    acked: Mapping[uuid.UUID, Collection[int]]
    freed: Mapping[uuid.UUID, Collection[str]]
    delete: bool
    relay: str | None


class Written(NamedTuple):
    """What a write of confirms did: how many rows their claims still owned, keys freed."""

    owned: int
    freed: FreedKeys


NOTHING_WRITTEN = Written(0, NOTHING_FREED)


def create_engine(
    url: str,
    *,
    application_name: str,
    db_timeout: float,
    idle_in_transaction_timeout: float | None = None,
) -> sa.Engine:
    """An engine for the relay: bounded waits, and a name operators can find in pg_stat_activity.

    Its sessions' settings go in libpq's `options` (after the user's own, which are kept:
    `?options=-csearch_path%3Dapp`, a libpq service's, `PGOPTIONS`), and every new
    connection checks that they arrived
    (`relay.session_options`: a pooler such as PgBouncer refuses or drops them; the relay
    then goes on without its own and says what to set instead, or refuses if the user's own
    would be lost). psycopg never prepares statements on its own here: a pooler in
    transaction mode hands each transaction another server session, where a statement
    prepared on the last one does not exist."""
    sa_url = sa.make_url(url)
    if sa_url.drivername in ("postgresql", "postgres"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    if sa_url.get_backend_name() == "postgresql":
        timeout_ms = int(db_timeout * 1000)
        # The relay's transactions are never idle for more than moments. One that is (its
        # relay froze between two of its statements) keeps the keys it locked, and the
        # writers' locks of keys it was removing: the server ends it after this long. (A
        # claim, and a write of confirms, is one round trip: the server never waits for the
        # relay inside it.)
        idle_ms = int((idle_in_transaction_timeout or 2 * db_timeout) * 1000)
        # synchronous_commit=off: the relay's bookkeeping need not wait for the disk. A
        # server crash can forget the last moments of marks and leases; that only makes
        # those events go out again (same message_id), it never loses one. The
        # application's own transactions are not affected.
        # plan_cache_mode=force_custom_plan: a statement prepared on the server may
        # otherwise keep a generic plan, made without the values: one made while the table
        # was small seq-scanned it after a burst (the mark: 45 to 250 ms per write), and
        # none can use the index of pending rows (its status is a parameter). Plans see the
        # values, at the cost of planning. The claim's read is the one exception, written
        # for its generic plan (`Store._claim_script`).
        # default_transaction_isolation: for the statements sent alone (renewals), which a
        # stricter default would fail on a concurrent change (serialization failures read
        # as outages). Scripts and transactions set their level themselves, where options
        # do not reach (a pooler).
        relay_options = (
            f"-c statement_timeout={timeout_ms} "
            f"-c idle_in_transaction_session_timeout={idle_ms} "
            "-c synchronous_commit=off -c plan_cache_mode=force_custom_plan "
            "-c default_transaction_isolation=read\\ committed"
        )
        sa_url, given_options = url_options(sa_url)
        check = SessionCheck(sa_url, given_options, timeout=db_timeout)
        engine = sa.create_engine(
            sa_url,
            # The claim and the writes of results rely on each statement of a transaction
            # taking its own snapshot, whatever default the database or role sets (scripts
            # set it themselves: `Store._script`).
            isolation_level="READ COMMITTED",
            # The daemon's two database lanes keep two connections each (one for
            # transactions, one in autocommit), its loop two for the claims it runs itself;
            # the metrics' gauge reads and the loop's final writes at shutdown take the rest.
            pool_size=5,
            max_overflow=3,
            # No pre-ping round trip per transaction: a broken connection fails the call,
            # which the relay treats as an outage (it retries with backoff).
            connect_args={
                "application_name": application_name[:63],
                "connect_timeout": max(1, int(db_timeout)),
                # Later settings win: the relay's own come after the user's.
                "options": joined(check.options, relay_options),
                "prepare_threshold": None,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
        )
        check.listen(engine)
        return engine
    return sa.create_engine(sa_url)


def _keep_in_setting(name: str, array: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """Keep `array` in the transaction-local setting `name`, as text (any key's characters
    survive it; none is an empty array), for a later statement of the same script."""
    as_text = sa.func.coalesce(sa.cast(array, sa.Text()), sa.literal_column("'{}'"))
    return sa.func.set_config(sa.literal_column(f"'{name}'"), as_text, sa.true())


def _read_from_setting(name: str, element: sa.types.TypeEngine[Any]) -> sa.ColumnElement[Any]:
    """The array an earlier statement kept in the setting `name` (`_keep_in_setting`)."""
    return sa.cast(
        sa.func.current_setting(sa.literal_column(f"'{name}'")), postgresql.ARRAY(element)
    )


def _array_of(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The values of a subquery's column as one array (cast: `= ANY (SELECT ...)` would
    compare with each row of the subquery instead)."""
    array = sa.select(sa.func.array_agg(column)).scalar_subquery()
    return sa.cast(array, postgresql.ARRAY(column.type))


def _is_pending(events: sa.Table) -> sa.ColumnElement[bool]:
    """`status = 'pending'` with the value in the statement's text, not a parameter: a
    generic plan (one made without the values) can then read the index of pending rows,
    whose predicate is that same test."""
    return events.c.status == sa.literal_column(f"'{PENDING}'", events.c.status.type)


def _pending_by_seq(events: sa.Table) -> sa.ColumnElement[bool]:
    """`status = 'pending'`, for a statement that finds its rows by seq, written so that it
    does not match the index of pending rows by key: before ANALYZE has seen a burst of one
    key (a fresh backlog), the planner took that index for `seq = ...`, its second column,
    and walked all of it (marking confirms: 14 ms per write with 30,000 rows pending, against
    0.5 by primary key)."""
    return events.c.status + "" == PENDING


class Store:
    def __init__(
        self,
        engine: sa.Engine,
        outbox: Outbox,
        *,
        db_timeout: float,
        watchdog: Watchdog | None = None,
        keep_connections: bool = False,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.db_timeout = db_timeout
        self._watchdog = watchdog
        self._postgres = engine.dialect.name == "postgresql"
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # With `keep_connections` (the relay daemon, whose database work runs on one thread),
        # each thread keeps its connections (one for transactions, one in autocommit) rather
        # than taking them from the pool for every statement: a checkout and checkin cost
        # about as much CPU as the statement itself. A connection that failed is dropped.
        # Without it (tools, tests: many stores on one engine), every use goes to the pool.
        self._keep_connections = keep_connections
        self._local = threading.local()
        # Until prepared statements turn out not to stay with a session (`_claim_postgres`).
        self._claims_prepared = True
        # Until a connection for claims here lacks the session's settings (a pooler).
        self._behind_pooler = False
        # Whether claims can answer before the write they carry (`_answers_early`).
        self._early_answers: bool | None = None
        # Scripts' statements split at their placeholders (`_template`), by text.
        self._templates: dict[str, LiteralTemplate] = {}
        self._kept: list[Connection] = []
        self._kept_lock = threading.Lock()
        # Statements and transactions sent, through SQLAlchemy or the driver path, and who
        # wants to see each statement's text (the benchmarks).
        self.queries_total = 0
        self.transactions_total = 0
        # Each observer is called before every statement goes out, with the connection
        # (SQLAlchemy's; on the driver path, psycopg's) and the statement's text.
        self.statement_observers: list[Callable[[Any, str], None]] = []
        sa.event.listen(engine, "before_cursor_execute", self._sqlalchemy_statement)

    def _sqlalchemy_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self._sent(conn, statement)

    def _sent(self, conn: Any, statement: str, *, statements: int = 1) -> None:
        self.queries_total += statements
        for observer in self.statement_observers:
            observer(conn, statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction with a deadline; driver errors become RelayErrors."""
        try:
            # The deadline spans the COMMIT too: its answer can be lost like any other.
            with (
                self._connection("transactions", self.engine) as conn,
                self._deadline(conn),
                conn.begin(),
            ):
                self.transactions_total += 1
                yield conn
        except sa.exc.DBAPIError as exc:
            raise translate_db_error(exc) from exc

    def _execute_alone(
        self, statement: sa.Executable, parameters: Mapping[str, Any] | None = None
    ) -> sa.CursorResult[Any]:
        """A single statement in autocommit: one round trip, no BEGIN and COMMIT."""
        try:
            with self._connection("autocommit", self._autocommit) as conn, self._deadline(conn):
                return conn.execute(statement, parameters)
        except sa.exc.DBAPIError as exc:
            raise translate_db_error(exc) from exc

    @contextlib.contextmanager
    def _driver(self) -> Iterator[psycopg.Cursor[Any]]:
        """PostgreSQL: a psycopg cursor on the autocommit connection SQLAlchemy would use,
        for the statements of `relay.driver_sql` and the scripts (`_script`), each its own
        transaction. The same connections, deadlines and error translation as
        `_execute_alone()`; only SQLAlchemy's execution layer is left out: its cursor events
        do not fire, so SQLAlchemy instrumentation does not see these statements
        (`statement_observers` do)."""
        try:
            with self._connection("autocommit", self._autocommit) as conn, self._deadline(conn):
                driver = conn.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                try:
                    with driver.cursor() as cursor:
                        yield cursor
                except psycopg.Error as exc:
                    raise self._driver_error(conn, driver, exc) from exc
        except sa.exc.DBAPIError as exc:
            raise translate_db_error(exc) from exc

    def _driver_error(
        self, conn: Connection, driver: psycopg.Connection[Any], exc: psycopg.Error
    ) -> sa.exc.DBAPIError:
        """The exception SQLAlchemy's own error handling makes of a driver error, with its
        side effects: a disconnect (the server ended the session, e.g. an idle-in-transaction
        timeout, which psycopg reports as an InternalError; a cut link) invalidates the
        connection, and the pool's connections older than it, as SQLAlchemy does, so that
        none of them goes back into use; anything else is rolled back."""
        error: Any = exc  # SQLAlchemy types the driver's exceptions loosely
        disconnect = (
            driver.closed
            or driver.broken
            or self.engine.dialect.is_disconnect(error, conn.connection, None)
        )
        wrapped = sa.exc.DBAPIError.instance(
            None, None, exc, psycopg.Error, connection_invalidated=disconnect
        )
        assert isinstance(wrapped, sa.exc.DBAPIError)
        if disconnect:
            # SQLAlchemy's Connection._handle_dbapi_exception does the same two steps.
            self.engine.pool._invalidate(conn.connection, exc)
            conn.invalidate(exc)
        elif not driver.closed:
            with contextlib.suppress(psycopg.Error):
                driver.rollback()
        return wrapped

    def _run(
        self, cursor: psycopg.Cursor[Any], name: str, parameters: Mapping[str, Any]
    ) -> psycopg.Cursor[Any]:
        """Run the driver statement `name` (a cached statement of this class) on `cursor`."""
        statement = self._driver_statements[name]
        self._sent(cursor.connection, statement.sql)
        return statement.run(cursor, parameters)

    def _rows(
        self, cursor: psycopg.Cursor[Any], name: str, parameters: Mapping[str, Any]
    ) -> Sequence[Any]:
        """Run the driver statement `name`; the rows it returns."""
        result = self._run(cursor, name, parameters)
        return result.fetchall() if result.description is not None else []

    def _count(self, cursor: psycopg.Cursor[Any], name: str, parameters: Mapping[str, Any]) -> int:
        """Run the driver statement `name`; how many rows it changed."""
        return int(self._run(cursor, name, parameters).rowcount)

    @functools.cached_property
    def _driver_statements(self) -> dict[str, DriverStatement]:
        dialect = self.engine.dialect
        return {
            name: DriverStatement(getattr(self, name), dialect)
            for name in (
                "_lock_claim_keys",
                "_claim_statement",
                "_has_ready",
                "_mark_published",
                "_delete_published",
                "_end_leases_noting_lockable",
                "_delete_drainable",
            )
        }

    @contextlib.contextmanager
    def _connection(self, role: str, engine: sa.Engine) -> Iterator[Connection]:
        if not self._keep_connections:
            with engine.connect() as conn:
                yield conn
            return
        conn = self._kept_connection(role, engine)
        try:
            yield conn
        except BaseException:
            self._drop_connection(role, conn)
            raise

    def _kept_connection(self, role: str, engine: sa.Engine) -> Connection:
        conn: Connection | None = getattr(self._local, role, None)
        if conn is not None and not _idle_and_open(conn):
            self._drop_connection(role, conn)
            conn = None
        if conn is None or conn.closed or conn.invalidated:
            if getattr(self._local, "deadline", None) is not None:
                # Under `deadline()` nothing connects: a connect is bounded only by the
                # connection's own timeout (`claims_here_possible` said they were open).
                raise DatabaseUnavailableError(
                    f"database unavailable: no open {role} connection for this call"
                )
            conn = engine.connect()
            setattr(self._local, role, conn)
            with self._kept_lock:
                self._kept.append(conn)
        return conn

    def _drop_connection(self, role: str, conn: Connection) -> None:
        """After any error: the connection's state is not known (a timeout may have cut it
        mid-statement), so the next statement gets a new one."""
        setattr(self._local, role, None)
        with self._kept_lock:
            if conn in self._kept:
                self._kept.remove(conn)
        try:
            conn.invalidate()
            conn.close()
        except Exception:
            log.debug("closing a failed connection failed", exc_info=True)

    # -- a connection for the loop's own thread -------------------------------------------

    @property
    def claims_here_supported(self) -> bool:
        """Whether a claim can run on the relay loop's own thread (`claims_here_possible`):
        PostgreSQL (claims that answer before their write), kept connections and a watchdog
        (every call bounded by its deadline), and no pooler between: a pooler in transaction
        mode hands the session to other clients between transactions, and a cancel sent at
        a claim's deadline could end one of theirs (PgBouncer before 1.18 did so)."""
        return (
            self._postgres
            and self._keep_connections
            and self._watchdog is not None
            and self._claims_prepared
            and not self._behind_pooler
        )

    def claims_here_possible(self) -> bool:
        """Whether a claim from this thread would be bounded and open no connection: this
        thread keeps both connections a claim uses open and idle (the claim's, and the
        transaction that drops the keys it found empty); otherwise `_kept_connection` would
        connect, for as long as the connection's own timeout."""
        if not self.claims_here_supported:
            return False
        usable = True
        for role in CLAIM_ROLES:
            conn: Connection | None = getattr(self._local, role, None)
            if conn is None:
                usable = False
            elif not _idle_and_open(conn):
                self._drop_connection(role, conn)  # for `keeps_claim_connections`
                usable = False
        return usable

    def keeps_claim_connections(self) -> bool:
        """Whether this thread keeps a connection of every role a claim uses (looked at
        without a system call: `claims_here_possible` drops one that failed)."""
        for role in CLAIM_ROLES:
            conn: Connection | None = getattr(self._local, role, None)
            if conn is None or conn.invalidated:  # left by `_deadline`: no system call
                return False
        return True

    def open_claim_connections(self) -> list[Connection]:
        """New connections for a claim (one per role of `CLAIM_ROLES`), made on this thread
        (each may wait for the connection's timeout) for another thread to adopt
        (`adopt_claim_connections`)."""
        opened: list[Connection] = []
        try:
            for role in CLAIM_ROLES:
                opened.append((self._autocommit if role == "autocommit" else self.engine).connect())
            pooled = any(conn.info.get(OPTIONS_ARRIVED) is False for conn in opened)
            pooled = pooled or _pooled(opened[0])
        except BaseException as exc:
            self.close_connections(opened)
            if isinstance(exc, sa.exc.DBAPIError):
                raise translate_db_error(exc) from exc
            raise
        if pooled:
            self.close_connections(opened)
            self._behind_pooler = True
            log.info(
                "claims stay on the claim thread: the database is reached through a pooler, "
                "where a claim's cancel at its deadline could reach another client's session"
            )
            return []
        return opened

    def adopt_claim_connections(self, conns: Sequence[Connection]) -> None:
        """From now on this thread's connections for claims, kept as any (one that fails is
        dropped: `_connection`); those it kept before are closed."""
        for role, conn in zip(CLAIM_ROLES, conns, strict=True):
            old: Connection | None = getattr(self._local, role, None)
            if old is not None:
                self._drop_connection(role, old)
            setattr(self._local, role, conn)
            with self._kept_lock:
                self._kept.append(conn)

    @staticmethod
    def close_connections(conns: Iterable[Connection]) -> None:
        """Closed for good, not handed back to the pool (which may be disposed by now: a
        session handed back to it then would stay open)."""
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """The database calls of this thread inside the block share `seconds` (a claim on
        the relay loop's thread, which must not hold the loop longer). The call running
        when they are up is cancelled on the server (its transaction rolled back, nothing
        of it committed), and its socket shut down `seconds` later if the cancel did not
        end it (a dead link). Never longer than `db_timeout` per call. Nothing connects
        inside the block: a call without an open connection fails at once."""
        self._local.deadline = (time.monotonic() + seconds, seconds)
        try:
            yield
        finally:
            self._local.deadline = None

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
        shared: tuple[float, float] | None = getattr(self._local, "deadline", None)
        if shared is None:
            with self._watchdog.guard(fd, self.db_timeout):
                yield
            return
        ends_at, grace = shared
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        with self._watchdog.guard(
            fd,
            min(self.db_timeout, max(0.0, ends_at - time.monotonic())),
            cancel=lambda: driver.cancel_safe(timeout=grace),
            grace=grace,
        ) as guard:
            yield
        if guard.cancelled:
            # The call ended as its cancel went out: the cancel may still reach the
            # session and end its next statement. The session is left for good.
            conn.invalidate()

    # -- the claim -------------------------------------------------------------------------

    def claim(
        self,
        *,
        owner: str,
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
        now: dt.datetime,
    ) -> Claim:
        """Lease up to `limit` events: for each ready key, in round-robin order, its first
        pending rows (at most `run_length`), and events without a key.

        Why each key's rows are a gap-free prefix of its pending rows, in write order:
        1. The key rows are locked (`FOR UPDATE SKIP LOCKED`) *before* the statement that reads
           their events starts, so that statement's snapshot sees every lease, hold and
           requeue committed before the lock, and nothing can change them until this claim
           commits (requeue and purge lock the key row too; see `relay.admin`). On
           PostgreSQL both statements go in one script, one round trip (`_claim_postgres`):
           each statement of it still takes its own snapshot, after the one before it ended.
        2. A key is only ready when no relay holds a lease on it, its head is not waiting for
           a retry, and no dead event holds it: all of that is the key row's state, checked
           on the locked row (PostgreSQL re-checks the WHERE clause of a locked row that
           changed meanwhile).
        3. Writers number a key's rows in commit order (see `outbox.ddl`), so what one
           snapshot sees of a key is a prefix of its order; a row committing later has a
           larger seq and comes after.
        Keys that are locked by another claim right now are skipped, never waited for: claims
        of several relays take disjoint keys at the same moment, and a claim stalled on the
        server (or, on SQLite, a relay frozen inside its claim) only keeps the keys it had
        locked.

        Why a held or busy key never delays another: held keys are not in the index claims
        read (`NOT held`), leased and retrying keys sort after `now`, and every key gets at
        most `run_length` rows per claim and then goes to the back of the line (its
        `available_at` becomes the time it is freed).

        The claim's `limit` rows are shared among the keys it locked, in rounds: every key's
        first row, then every key's second row, and so on (`_per_key`), so that a claim
        that locks many keys serves all of them rather than the first few their full run:
        with 1,000 busy keys and a batch of 2,000, two each for 1,000 keys in flight, not
        fifty each for forty. A key with fewer rows leaves its turns to the others. Each
        key's rows still form a prefix: a round is only reached once every earlier one is
        in. A claim reads at most `limit` key rows and about twice `limit` event rows,
        whatever the backlog.
        """
        return self.write_and_claim(
            None, owner=owner, limit=limit, run_length=run_length, lease_until=lease_until, now=now
        )[1]

    def write_and_claim(
        self,
        carried: Carried | None,
        *,
        owner: str,
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
        now: dt.datetime,
    ) -> tuple[Written, Claim]:
        """`mark_and_end_runs` of `carried`, then `claim`, in one transaction (on PostgreSQL
        one script, one round trip): the write of confirms that a claim carries
        (`relay.relay`). The marks and ends of runs are the ones `mark_and_end_runs` makes;
        so is the claim `claim` makes.

        Why the claim is still a claim's prefix of each key, and never reads what the write
        confirmed: its statements run after the write's, each with a snapshot of its own, and
        a transaction sees its own changes. A key the write frees is ready to the claim's
        lock (its row is already locked by this transaction, which takes its own locks
        again), and the rows the write marked are no longer pending for the read. A failure
        rolls all of it back: nothing is marked, freed or leased. (`carried` None: the claim
        alone, and nothing written.)

        What it costs: the writers' locks of the keys the write frees (taken where no writer
        holds them, `_end_leases_noting_lockable`) are held until the claim commits, so a
        writer adding an event to such a key waits for the claim (about a millisecond at
        low rates)."""
        token = uuid.uuid4()
        written = NOTHING_WRITTEN
        if self._postgres:
            write = self._write_steps(carried, now) if carried is not None else ([], {})
            keys, rows, results = self._claim_postgres(
                self._claim_parameters(token, owner, limit, run_length, lease_until, now), write
            )
            events = [ClaimedEvent.from_values(row, token) for row in rows]
            if carried is not None:
                written = self._written(results)
        else:
            with self.transaction() as conn:
                if carried is not None:
                    written = self._write_sqlite(conn, carried, now)
                keys = list(conn.scalars(self._lock_ready_keys, {"limit": limit, "now": now}))
                rows = self._claim_sqlite(
                    conn,
                    keys,
                    token=token,
                    owner=owner,
                    limit=limit,
                    run_length=run_length,
                    lease_until=lease_until,
                    now=now,
                )
                events = [ClaimedEvent.from_row(row, token) for row in rows]
        claim, empty = self._claim_of(token, keys, events, limit, run_length, lease_until)
        self._drop_empty_after_claim(empty, now)
        return written, claim

    def claim_then_write(
        self,
        carried: Carried,
        *,
        answer: Callable[[Claim], None],
        owner: str,
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
        now: dt.datetime,
    ) -> tuple[Written, Claim | None]:
        """`claim`, then `mark_and_end_runs` of `carried`, in one round trip on PostgreSQL but
        two transactions: the claim's commits first, and its answer goes to `answer` (on this
        thread) as soon as the server has sent it, while the server runs the write. The
        events a claim carrying confirms takes then wait for the claim alone, not for the
        write too (about half a millisecond at low rates; `write_and_claim` writes first).

        Why it is safe: the two transactions are those `claim` and `mark_and_end_runs` make,
        in that order, as when a claim is followed by a write alone; each statement takes its
        own snapshot. The claim cannot take a key the write frees, as this relay still holds
        its lease: the relay sends no claim once one of its leases could have run out
        (`Relay._leases_safe`). A lease run out unnoticed would let the claim take the key
        back and fence off the write's confirms, and those events would go out again (same
        message_id). The write says how many of the keys it freed have events left
        (`FreedKeys.kept`), and the relay claims again for them (`relay.results`).

        Why the answer comes before the write: the server keeps a query's results until the
        query ends, but sends everything it has as soon as it sends a notice. The statement
        after the claim's COMMIT (which chains the write's transaction to it, at the same
        isolation level) raises one, at a level set for that transaction only, so that a
        `client_min_messages` of the role's cannot suppress it. Were it not sent, the answer
        would come with the write's, later, and nothing else would change.

        `answer` runs on this thread while the query is still being read: it must not use
        this store, and must not raise (the server runs the write all the same).

        Failures: a failing claim ends the query before the write; nothing is claimed or
        written, and `answer` is not called. A write failing after `answer` was called is
        raised; its transaction is rolled back, and the claim stays committed. On SQLite,
        `claim`, `answer`, then `mark_and_end_runs`. Where the relay's role may not run a
        `DO` block (USAGE on plpgsql revoked: found at the first such claim), this is
        `write_and_claim`, and the claim comes back with the write instead of going to
        `answer` (the caller then subtracts the keys it took again, as after
        `write_and_claim`); refused at the notice itself, the write goes alone after the
        claim. Returns the write, and the claim unless `answer` had it."""
        token = uuid.uuid4()
        if self._postgres and not self._answers_early():
            return self.write_and_claim(
                carried,
                owner=owner,
                limit=limit,
                run_length=run_length,
                lease_until=lease_until,
                now=now,
            )
        if not self._postgres:
            answer(
                self.claim(
                    owner=owner,
                    limit=limit,
                    run_length=run_length,
                    lease_until=lease_until,
                    now=now,
                )
            )
            written = self.mark_and_end_runs(
                carried.acked,
                carried.freed,
                now=now,
                delete=carried.delete,
                relay=carried.relay,
            )
            return written, None
        empty: list[str] = []

        def claimed(keys: list[str], rows: list[Any]) -> None:
            events = [ClaimedEvent.from_values(row, token) for row in rows]
            claim, found_empty = self._claim_of(token, keys, events, limit, run_length, lease_until)
            empty.extend(found_empty)
            answer(claim)

        parameters = self._claim_parameters(token, owner, limit, run_length, lease_until, now)
        write = self._write_steps(carried, now)
        self.transactions_total += 1  # the write's; `_claim_postgres` counts the claim's
        _, _, results = self._claim_postgres(parameters, write, answered=claimed)
        # After the write: dropping keys takes writers' locks, which must not wait on it.
        self._drop_empty_after_claim(empty, now)
        return self._written(results), None

    def _answers_early(self) -> bool:
        """Whether this relay's role can raise the notice of `ANSWER_NOW` (checked once)."""
        if self._early_answers is None:
            with self._driver() as cursor:
                self._sent(cursor.connection, ANSWER_NOW[-1][1])
                try:
                    cursor.execute(ANSWER_NOW[-1][1])
                    self._early_answers = True
                except psycopg.Error as exc:
                    if cursor.connection.broken or isinstance(exc, psycopg.OperationalError):
                        raise  # an outage or a timeout, not a refusal: looked at again
                    self._no_early_answers(exc)
        return self._early_answers is True

    def _no_early_answers(self, refusal: psycopg.Error) -> None:
        log.warning(
            "the relay's database role cannot run a DO block (%s): a claim that writes "
            "confirms now waits for the write before it answers",
            str(refusal).strip(),
        )
        self._early_answers = False

    @staticmethod
    def _claim_parameters(
        token: uuid.UUID,
        owner: str,
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
        now: dt.datetime,
    ) -> dict[str, Any]:
        return {
            "token": token,
            "owner": owner,
            "limit": limit,
            "keyless_limit": max(1, limit // 2),
            "run_length": run_length,
            "lease_until": lease_until,
            "now": now,
        }

    @staticmethod
    def _claim_of(
        token: uuid.UUID,
        keys: list[str],
        events: list[ClaimedEvent],
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
    ) -> tuple[Claim, list[str]]:
        """The claim of `events` from the locked `keys`, and the keys it found empty."""
        # Keys that gave no rows are empty, unless the claim's room ran out inside the first
        # round (only keys after the last one served can have been cut then). A cut key's
        # lock simply ended with the claim.
        served = collections.Counter(e.key for e in events if e.key is not None)
        keyed = sum(served.values())
        room_left = keyed < limit - (len(events) - keyed)
        if room_left or max(served.values(), default=0) > 1:
            empty = [key for key in keys if key not in served]
        else:
            last = max((keys.index(key) for key in served), default=len(keys) - 1)
            empty = [key for key in keys[: last + 1] if key not in served]
        # A key that got its whole share (`_per_key`) may have more; with the room run out,
        # any key may.
        share = _per_key(limit, len(keys), run_length)
        unfinished = frozenset(
            key for key, count in served.items() if count >= share or not room_left
        )
        claim = Claim(
            token=token,
            events=tuple(sorted(events, key=lambda e: e.seq)),
            lease_until=lease_until,
            unfinished=unfinished,
        )
        return claim, empty

    def _drop_empty_after_claim(self, empty: Collection[str], now: dt.datetime) -> None:
        """Drop the keys a claim found empty, in a transaction of their own (it takes writers'
        locks, which must not wait on the claim). After the claim's commit: an outage here
        must not fail the claim (the relay would take its written results for unwritten, and
        lose sight of its events until their leases ran out). The keys stay for a later
        claim to drop."""
        if not empty:
            return
        try:
            self._drop_empty(empty, now)
        except DatabaseUnavailableError as exc:
            log.warning("could not drop %d empty keys (%s); a later claim will", len(empty), exc)

    def _drop_empty(self, empty: Collection[str], now: dt.datetime) -> None:
        with self.transaction() as conn:
            k = self.outbox.keys
            free = sa.select(k.c.key).where(self._one_of(k.c.key, empty), k.c.lease_token.is_(None))
            if self._postgres:
                free = free.with_for_update(skip_locked=True)
            self._drop_empty_keys(conn, list(conn.scalars(free)), now=now)

    def _ready_now(self, now: dt.datetime | None = None) -> sa.ColumnElement[Any]:
        """The relay's clock, as leases and retry times are set with it (hosts need NTP).
        Without `now`, the parameter `now` of a statement built once."""
        if now is None:
            return sa.bindparam("now", type_=sa.DateTime(timezone=True))
        return sa.bindparam(None, now, type_=sa.DateTime(timezone=True))

    def _claim_postgres(
        self, given: Mapping[str, Any], write: Script, *, answered: Answered | None = None
    ) -> tuple[list[str], list[Any], dict[str, StepResult]]:
        """The claim's statements as one script (`_claim_script`), after those of `write`
        (`write_and_claim`; none for a claim alone): one query, one implicit transaction,
        one round trip. The locked keys (in the order they were locked), the rows read, each
        row a `ClaimedEvent`'s values (`CLAIMED_COLUMNS`), and what every step gave.

        Each statement of a script takes its own snapshot (READ COMMITTED), so the read
        sees every change committed before the keys were locked, exactly as two
        statements in a transaction would (see `claim`); the keys go from the first to the
        second statement through a transaction-local setting (`CLAIM_KEYS`), as the
        second is sent before the first has answered.

        The read is prepared on the session first if it is not yet (a statement of its
        own, once per session). A session that lost it (psycopg deallocates every prepared
        statement of a session after some commands) prepares it again; a read missing twice
        in a row means prepared statements do not stay with the connection (PgBouncer in
        transaction mode): this store then sends the read itself every time.

        With `answered`, the claim goes first and `write` after it (`claim_then_write`):
        `answered` gets the locked keys and the rows read once the claim has committed."""
        with self._driver() as cursor:
            conn = cursor.connection
            self.transactions_total += 1
            for attempt in range(3):
                read = self._claim_prepared if self._claims_prepared else None
                if read is not None and read.needs_prepare(conn):
                    self._prepare(cursor, read)
                try:
                    return self._run_claim_script(conn, given, read, write, answered)
                except psycopg.errors.InvalidSqlStatementName:
                    # The claim's transaction was rolled back with it (the write, if after
                    # it, never ran): nothing is written, locked or leased. An explicit
                    # transaction (`claim_then_write`) is left aborted until rolled back.
                    conn.rollback()
                    if read is None:
                        raise
                    read.forget(conn)
                    if attempt > 0:
                        self._claims_prepared = False
                        log.warning(
                            "the claim's prepared statement did not stay on the database "
                            "session (a pooler in transaction mode?): claims now send and "
                            "plan their read every time"
                        )
            raise AssertionError("a claim without a prepared statement cannot miss it")

    def _prepare(self, cursor: psycopg.Cursor[Any], read: PreparedOnServer) -> None:
        self._sent(cursor.connection, read.prepare_sql)
        # Already there: another store of this outbox prepared it on this pooled session.
        with contextlib.suppress(psycopg.errors.DuplicatePreparedStatement):
            cursor.execute(read.prepare_sql)
        read.prepared_on(cursor.connection)

    def _run_claim_script(
        self,
        conn: psycopg.Connection[Any],
        given: Mapping[str, Any],
        read: PreparedOnServer | None,
        write: Script,
        answered: Answered | None,
    ) -> tuple[list[str], list[Any], dict[str, StepResult]]:
        lock = self._driver_statements["_lock_claim_keys"]
        statement = read if read is not None else self._driver_statements["_claim_statement"]
        write_steps, write_values = write
        values = {
            **write_values,
            "lock": lock.parameters(given),
            "read": statement.parameters(given),
        }
        if answered is None:
            results = self._script(conn, [*write_steps, *self._claim_script(read)], values)
            return _locked_keys(results), results["read"].rows, results

        answered_steps: list[str] = []
        claimed: list[tuple[list[str], list[Any]]] = []

        def progress(step: str, so_far: Mapping[str, StepResult]) -> None:
            answered_steps.append(step)
            if step == "commit claim":
                claimed.append((_locked_keys(so_far), so_far["read"].rows))
                answered(*claimed[0])

        steps = [*self._claim_script(read), *ANSWER_NOW, *write_steps, ("commit write", "COMMIT")]
        try:
            results = self._script(
                conn, steps, values, first=BEGIN_READ_COMMITTED, progress=progress
            )
        except psycopg.Error as exc:
            refused = not conn.broken and not isinstance(exc, psycopg.OperationalError)
            if answered_steps[-1:] != [ANSWER_NOW[-2][0]] or not refused:
                raise
            # The notice itself was refused (the role lost USAGE on plpgsql since
            # `_answers_early` looked, or the server has no DO): the claim committed and
            # answered, the write was rolled back. It goes alone now, and from here on
            # claims write first.
            conn.rollback()
            self._no_early_answers(exc)
            results = self._script(conn, write_steps, write_values)
        keys, rows = claimed[0]
        return keys, rows, results

    def _claim_script(self, read: PreparedOnServer | None) -> list[tuple[str, str]]:
        """The claim's statements, named, in the order they run.

        With the read prepared on the session (`read`): its generic plan chosen, as
        planning this statement cost more than running it (about 1 ms, and 5 under load).
        Its plan cannot depend on the keys, which come from a setting, and its status test
        is a literal, so the generic plan can read the index of pending rows. Sequential
        scans are off for it: a generic plan made while the table was small would
        otherwise seq-scan the table once per key after a burst (2 s per claim, until the
        next ANALYZE), as the plan is kept while the table grows; for the same reason its
        updates find their rows by `= ANY(array)`. And no JIT compilation: the planner
        cannot see the per-key limit, so its cost estimate of a large backlog crosses the
        JIT thresholds (1 to 2 s of compiling per claim). Tests pin these shapes.
        Then the keys locked, and the events read and leased."""
        if read is None:
            return [
                ("lock", self._driver_statements["_lock_claim_keys"].sql),
                ("read", self._driver_statements["_claim_statement"].sql),
            ]
        return [
            ("plan", "SET LOCAL plan_cache_mode = force_generic_plan"),
            ("no seq scan", "SET LOCAL enable_seqscan = off"),
            ("no jit", "SET LOCAL jit = off"),
            ("lock", self._driver_statements["_lock_claim_keys"].sql),
            ("read", read.execute_sql),
        ]

    @functools.cached_property
    def _claim_prepared(self) -> PreparedOnServer:
        return PreparedOnServer(self._claim_statement, self.engine.dialect, prefix="outbox_claim")

    def _ready_keys(self, *columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
        """Up to `limit` ready keys, oldest turn first, locked, skipping keys another claim
        is locking. Parameters: limit, now."""
        k = self.outbox.keys
        query = (
            sa.select(*columns)
            .where(~k.c.held, k.c.available_at <= self._ready_now())
            .order_by(k.c.available_at)
            .limit(sa.bindparam("limit", type_=sa.Integer()))
        )
        if self._postgres:
            query = query.with_for_update(skip_locked=True)
        return query

    @functools.cached_property
    def _lock_ready_keys(self) -> sa.Select[tuple[str]]:
        """SQLite: the claim's first statement, the keys it locks."""
        return self._ready_keys(self.outbox.keys.c.key)

    @functools.cached_property
    def _lock_claim_keys(self) -> sa.Select[Any]:
        """PostgreSQL: the claim's first statement. It locks the keys, keeps them in the
        transaction-local setting `CLAIM_KEYS` for the read (a text array: any key's
        characters survive it) and returns them in the order they were locked."""
        k = self.outbox.keys
        locked = self._ready_keys(k.c.key, k.c.available_at).cte("locked")
        keys = sa.func.array_agg(aggregate_order_by(locked.c.key, locked.c.available_at))
        return sa.select(keys, _keep_in_setting(CLAIM_KEYS, keys)).select_from(locked)

    @functools.cached_property
    def _claim_statement(self) -> sa.Select[Any]:
        """PostgreSQL: one statement (one snapshot, one round trip) that leases events without
        a key (up to `keyless_limit`), reads each locked key's first pending rows (at most
        the parameter `run_length`, see `_per_key`), keeps `limit` rows in all, in rounds
        (every key's first row, in the order the keys were locked, then every key's second
        row...) and leases the keys that gave rows. Every read goes by index, in index
        order: no bitmap scan, which would visit every dead index entry that published rows
        leave until vacuum runs.

        Built once, with its values as parameters: building a statement this size (and
        SQLAlchemy's column collections for it) cost more CPU than the rest of a claim."""
        t, k = self.outbox.events, self.outbox.keys
        keyless = self._lease_keyless.cte("keyless")
        keys = _read_from_setting(CLAIM_KEYS, sa.Text())
        # The keys in a CTE of their own, read from the setting once: in the generic plan
        # the setting is not a constant, and an expression of it in the read of each key
        # would parse the whole array once per key (2,000 keys of 255 bytes: 36 s).
        unnested = sa.func.unnest(keys).table_valued("key", with_ordinality="ord").render_derived()
        picked = sa.select(unnested.c.key, unnested.c.ord).cte("picked")
        # `_per_key`, in SQL (the number of keys is known only on the server), once per claim.
        n = (
            sa.select(sa.func.greatest(1, sa.func.count()).label("n"))
            .select_from(picked)
            .subquery("key_count")
        )
        limit = sa.bindparam("limit", type_=sa.Integer())
        run_length = sa.bindparam("run_length", type_=sa.Integer())
        per_key = sa.select(
            sa.func.greatest(1, sa.func.least(run_length, 2 * ((limit + n.c.n - 1) // n.c.n)))
        ).scalar_subquery()
        first_rows = (
            sa.select(t)
            # The key as a range, ordered by (key, seq): only the index of pending rows by key
            # gives that order. With `key = ...` the planner may treat the key as a constant,
            # take the table's seq order instead and walk every row of other keys (a key with
            # 100,000 events made each small key's read walk 100,000 rows).
            .where(t.c.key >= picked.c.key, t.c.key <= picked.c.key, _is_pending(t))
            .order_by(t.c.key, t.c.seq)
            .limit(per_key)
            .lateral("first_rows")
        )
        room = sa.select(limit - sa.func.count()).select_from(keyless).scalar_subquery()
        # Rounds: every key's first row, then every key's second row... (see `claim`).
        turn = sa.func.row_number().over(partition_by=picked.c.ord, order_by=first_rows.c.seq)
        keyed = (
            sa.select(first_rows)
            .select_from(picked)
            .join(first_rows, sa.true())
            .order_by(turn, picked.c.ord)
            .limit(room)
            .cte("keyed")
        )
        # `= ANY(array)`, not `IN (subquery)`: a generic plan made while the key table was
        # small joined the two by walking every key row once per claimed key (12 s per
        # claim with 10,000 keys); an array parameter can only be probed by index.
        leased = (
            sa.update(k)
            .where(k.c.key == sa.any_(_array_of(keyed.c.key)))
            .values(
                lease_token=sa.bindparam("token", type_=k.c.lease_token.type),
                leased_by=sa.bindparam("owner", type_=k.c.leased_by.type),
                available_at=sa.bindparam("lease_until", type_=k.c.available_at.type),
            )
            .returning(k.c.key)
            .cte("leased")
        )
        claimed = sa.select(keyed).union_all(sa.select(keyless)).subquery("claimed")
        return sa.select(*(claimed.c[name] for name in CLAIMED_COLUMNS)).add_cte(leased)

    def _claim_sqlite(
        self,
        conn: Connection,
        keys: Sequence[str],
        *,
        token: uuid.UUID,
        owner: str,
        limit: int,
        run_length: int,
        lease_until: dt.datetime,
        now: dt.datetime,
    ) -> list[RowMapping]:
        """The same claim in several statements: SQLite has one writer (one relay) and a
        transaction's reads share one snapshot anyway."""
        t, k = self.outbox.events, self.outbox.keys
        keyless = {
            "token": token,
            "owner": owner,
            "keyless_limit": max(1, limit // 2),
            "lease_until": lease_until,
            "now": now,
        }
        rows = list(conn.execute(self._lease_keyless, keyless).mappings())
        per_key = _per_key(limit, len(keys), run_length)
        firsts = [
            list(
                conn.execute(
                    sa.select(t)
                    .where(t.c.key == key, t.c.status == PENDING)
                    .order_by(t.c.seq)
                    .limit(per_key)
                ).mappings()
            )
            for key in keys
        ]
        rounds = sorted(
            (
                (turn, place, row)
                for place, found in enumerate(firsts)
                for turn, row in enumerate(found)
            ),
            key=lambda item: item[:2],
        )
        kept = [row for _, _, row in rounds[: max(0, limit - len(rows))]]
        rows.extend(kept)
        leased = list({row["key"]: None for row in kept})
        if leased:
            conn.execute(
                sa.update(k)
                .where(k.c.key.in_(leased))
                .values(lease_token=token, leased_by=owner, available_at=lease_until)
            )
        return rows

    @functools.cached_property
    def _lease_keyless(self) -> sa.Update:
        """Lease free events without a key (they keep no order), up to `keyless_limit` (half
        a claim), so that keyed events can never crowd them out nor they the keys. Parameters:
        token, owner, keyless_limit, lease_until, now."""
        t = self.outbox.events
        free = (
            sa.select(t.c.seq)
            .where(t.c.key.is_(None), _is_pending(t), *self._row_free())
            # (key, seq), the same order as seq here: only the index of pending rows by key
            # gives it, so no plan walks the table in seq order past every keyed row (a
            # generic plan did: 40,000 published rows read per claim; found by review).
            .order_by(t.c.key, t.c.seq)
            .limit(sa.bindparam("keyless_limit", type_=sa.Integer()))
        )
        chosen: sa.ColumnElement[bool]
        if not self._postgres:
            chosen = t.c.seq.in_(free.scalar_subquery())
        else:
            # As the keys' lease in `_claim_statement`: probed by index whatever the plan.
            rows = free.with_for_update(skip_locked=True).subquery("free")
            chosen = t.c.seq == sa.any_(_array_of(rows.c.seq))
        return (
            sa.update(t)
            .where(chosen)
            .values(
                claim_token=sa.bindparam("token", type_=t.c.claim_token.type),
                claimed_by=sa.bindparam("owner", type_=t.c.claimed_by.type),
                lease_until=sa.bindparam("lease_until", type_=t.c.lease_until.type),
            )
            .returning(*t.c)
        )

    def _row_free(self, now: dt.datetime | None = None) -> tuple[sa.ColumnElement[bool], ...]:
        """An event without a key that no relay holds and that is not waiting for a retry
        (at `now`, or at the parameter `now`)."""
        t = self.outbox.events
        at = self._ready_now(now)
        return (
            sa.or_(t.c.lease_until.is_(None), t.c.lease_until <= at),
            sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at <= at),
        )

    def _drop_empty_keys(
        self, conn: Connection, keys: Collection[str], *, now: dt.datetime
    ) -> set[str]:
        """Delete the rows of `keys` that have no pending event and hold nothing; the others go
        to the back of the line. Returns the keys deleted.

        Why a writer can never lose its key row to this: a writer holds its key's advisory
        lock from numbering its row until it commits (`outbox.ddl`). A key whose lock this
        transaction cannot take has a writer in progress, and is kept. For the others the lock
        is taken first, in its own statement, so the DELETE's snapshot (a later statement)
        sees every row committed by writers before it; a writer that comes later waits for
        the lock and, after this commits, finds no key row and inserts it again.
        """
        if not keys:
            return set()
        k = self.outbox.keys
        candidates = list(keys)
        if self._postgres:
            candidates = list(
                conn.scalars(
                    sa.select(k.c.key).where(self._one_of(k.c.key, keys), self._writers_lock)
                )
            )
        deleted: set[str] = set()
        if candidates:
            deleted = set(conn.scalars(self._delete_drained, {"keys": candidates}))
        kept = [key for key in keys if key not in deleted]
        if kept:
            conn.execute(
                sa.update(k)
                .where(self._one_of(k.c.key, kept), k.c.lease_token.is_(None))
                .values(available_at=now)
            )
        return deleted

    def has_ready(self, now: dt.datetime) -> bool:
        """A cheap look before a claim: is any key ready, or any event without a key?"""
        if self._postgres:
            with self._driver() as cursor:
                ((ready,),) = self._rows(cursor, "_has_ready", {"now": now})
            return bool(ready)
        return bool(self._execute_alone(self._has_ready, {"now": now}).scalar())

    @functools.cached_property
    def _has_ready(self) -> sa.Select[tuple[bool]]:
        k, t = self.outbox.keys, self.outbox.events
        key_ready = sa.exists().where(~k.c.held, k.c.available_at <= self._ready_now())
        keyless_ready = sa.exists().where(
            t.c.key.is_(None), t.c.status == PENDING, *self._row_free()
        )
        return sa.select(sa.or_(key_ready, keyless_ready))

    # -- results ---------------------------------------------------------------------------

    def _owned(self, token: uuid.UUID, seqs: Collection[int]) -> sa.ColumnElement[bool]:
        """An event (among `seqs`) this claim still owns: its key's lease, or (without a key)
        its own.

        The key rows are read with `FOR SHARE`: a takeover in progress (another relay's claim
        has locked the key and is leasing it) is waited for, and the key is then seen leased
        by the other token. Read without a lock, the old lease would still show, and this
        write could mark an event published under a claim that already holds it."""
        t, k = self.outbox.events, self.outbox.keys
        of_these = sa.select(t.c.key).where(self._one_of(t.c.seq, seqs))
        owned_keys = sa.select(k.c.key).where(k.c.key.in_(of_these), k.c.lease_token == token)
        if self._postgres:
            owned_keys = owned_keys.with_for_update(read=True)
        return sa.or_(t.c.claim_token == token, t.c.key.in_(owned_keys))

    def mark_published(
        self,
        acked: Mapping[uuid.UUID, Collection[int]],
        *,
        now: dt.datetime,
        delete: bool,
        relay: str | None = None,
    ) -> int:
        """Record confirmed rows (`seq`s by the token of the claim that leased them), in one
        statement whatever the number of claims; returns how many rows their claims still
        owned. The only write to an event row between its insert and its deletion by the
        retention purge."""
        pairs = [(seq, token) for token, seqs in acked.items() for seq in seqs]
        if not pairs:
            return 0
        if not self._postgres:
            with self.transaction() as conn:
                return self._mark_sqlite(conn, acked, now, delete, relay)
        with self._driver() as cursor:
            return self._count(
                cursor,
                "_delete_published" if delete else "_mark_published",
                self._mark_values(acked, now, relay),
            )

    @staticmethod
    def _mark_values(
        acked: Mapping[uuid.UUID, Collection[int]], now: dt.datetime, relay: str | None
    ) -> dict[str, Any]:
        pairs = [(seq, token) for token, seqs in acked.items() for seq in seqs]
        return {
            "seqs": [seq for seq, _ in pairs],
            "tokens": [token for _, token in pairs],
            "now": now,
            "relay": relay,
        }

    def _mark_sqlite(
        self,
        conn: Connection,
        acked: Mapping[uuid.UUID, Collection[int]],
        now: dt.datetime,
        delete: bool,
        relay: str | None,
    ) -> int:
        return sum(
            int(conn.execute(self._mark_one(token, seqs, now, delete, relay)).rowcount)
            for token, seqs in acked.items()
            if seqs
        )

    def _end_runs_sqlite(
        self, conn: Connection, freed: Mapping[uuid.UUID, Collection[str]], now: dt.datetime
    ) -> FreedKeys:
        ended = kept = 0
        for token, keys in freed.items():
            held, dropped = self._free_keys(conn, token, keys, now=now)
            ended += held
            kept += held - dropped
        return FreedKeys(ended, kept)

    def _mark_one(
        self,
        token: uuid.UUID,
        seqs: Collection[int],
        now: dt.datetime,
        delete: bool,
        relay: str | None,
    ) -> sa.Delete | sa.Update:
        """SQLite: the rows `seqs` of one claim, if it still owns them."""
        t = self.outbox.events
        owned = [self._one_of(t.c.seq, seqs), _pending_by_seq(t), self._owned(token, seqs)]
        if delete:
            return sa.delete(t).where(*owned)
        return sa.update(t).where(*owned).values(self._published_values(now, relay))

    def _published_values(self, now: Any, relay: Any) -> dict[str, Any]:
        return {
            "status": PUBLISHED,
            "published_at": now,
            "claimed_by": relay,
            "claim_token": None,
            "lease_until": None,
            "next_attempt_at": None,
        }

    def _confirmed_rows(self) -> sa.ColumnElement[bool]:
        """PostgreSQL: "the row is one of the pairs (seq, token) of the parameters `seqs` and
        `tokens`, and that claim still owns it": its own lease (no key) or its key's.

        The key rows are read with `FOR SHARE`: a takeover in progress (another relay's claim
        has locked the key and is leasing it) is waited for, and the key is then seen leased
        by the other token (a locked read sees the row's newest version, not the statement's
        snapshot). Read without a lock, the old lease would still show, and this write could
        mark an event published under a claim that already holds it."""
        t, k = self.outbox.events, self.outbox.keys
        seqs = sa.bindparam("seqs", type_=postgresql.ARRAY(t.c.seq.type))
        done = (
            sa.func.unnest(
                seqs, sa.bindparam("tokens", type_=postgresql.ARRAY(k.c.lease_token.type))
            )
            .table_valued("seq", "token")
            .render_derived()
        )
        confirmed = t.alias("confirmed")
        leases = (
            sa.select(k.c.key, k.c.lease_token)
            .where(k.c.key.in_(sa.select(confirmed.c.key).where(confirmed.c.seq == sa.any_(seqs))))
            .with_for_update(read=True)
        )
        return sa.and_(
            t.c.seq == done.c.seq,
            # Redundant, for the planner: it cannot know how many pairs the unnest gives
            # (it guesses 10) and, joined to that alone, hashed a scan of the whole table on
            # every write. `seq = ANY(seqs)` is an index condition with a known size.
            t.c.seq == sa.any_(seqs),
            _pending_by_seq(t),
            sa.or_(t.c.claim_token == done.c.token, sa.tuple_(t.c.key, done.c.token).in_(leases)),
        )

    @functools.cached_property
    def _mark_published(self) -> sa.Update:
        t = self.outbox.events
        values = self._published_values(
            sa.bindparam("now", type_=t.c.published_at.type),
            sa.bindparam("relay", type_=t.c.claimed_by.type),
        )
        return sa.update(t).where(self._confirmed_rows()).values(values)

    @functools.cached_property
    def _delete_published(self) -> sa.Delete:
        return sa.delete(self.outbox.events).where(self._confirmed_rows())

    def record_failures(
        self,
        token: uuid.UUID,
        failures: Sequence[Failure],
        *,
        relay: str,
        now: dt.datetime,
        hold_key: bool = True,
    ) -> int:
        """Schedule each failed event's retry or make it dead, keep the error history, and end
        the lease of its key: until the retry time, or (a dead event, with `hold_key`) until
        an operator requeues or purges it. Returns how many this claim still owned."""
        if not failures:
            return 0
        t, k = self.outbox.events, self.outbox.keys
        with self.transaction() as conn:
            keys = {f.event.key for f in failures if f.event.key is not None}
            owned_keys = set(
                conn.scalars(
                    sa.select(k.c.key)
                    .where(self._one_of(k.c.key, keys), k.c.lease_token == token)
                    .with_for_update()
                )
                if keys
                else ()
            )
            keyless = [f.event.seq for f in failures if f.event.key is None]
            owned_rows = set(
                conn.scalars(
                    sa.select(t.c.seq)
                    .where(self._one_of(t.c.seq, keyless), t.c.claim_token == token)
                    .with_for_update()
                )
                if keyless
                else ()
            )
            mine = [
                f
                for f in failures
                if (
                    f.event.key in owned_keys
                    if f.event.key is not None
                    else f.event.seq in owned_rows
                )
            ]
            recorded: list[Failure] = []
            for failure in mine:
                changed = conn.execute(
                    sa.update(t)
                    .where(t.c.seq == failure.event.seq, _pending_by_seq(t))
                    .values(
                        status=PENDING if failure.next_attempt_at else DEAD,
                        attempts=failure.attempt,
                        next_attempt_at=failure.next_attempt_at,
                        last_error=failure.error,
                        claim_token=None,
                        lease_until=None,
                    )
                ).rowcount
                if changed:
                    recorded.append(failure)
                if failure.event.key is None:
                    continue
                # The key's lease ends here. Unless the event was published meanwhile (a
                # relay's late confirm): then nothing failed, and the key neither waits for a
                # retry nor is held.
                dead = bool(changed) and failure.next_attempt_at is None
                retry_at = failure.next_attempt_at if changed else None
                conn.execute(
                    sa.update(k)
                    .where(k.c.key == failure.event.key, k.c.lease_token == token)
                    .values(
                        lease_token=None,
                        leased_by=None,
                        held=dead and hold_key,
                        available_at=retry_at or now,
                    )
                )
            if recorded:
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
                        for f in recorded
                    ],
                )
        return len(recorded)

    def release(
        self, token: uuid.UUID, seqs: Collection[int], *, now: dt.datetime | None = None
    ) -> int:
        """Give rows back unattempted (connection lost, run cut short, graceful stop): events
        without a key lose their own lease, the keys of the others are freed. Returns how many
        rows this claim still owned."""
        if not seqs:
            return 0
        t = self.outbox.events
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(t.c.seq, t.c.key).where(
                    self._one_of(t.c.seq, seqs), _pending_by_seq(t), self._owned(token, seqs)
                )
            ).all()
            keyless = [row.seq for row in rows if row.key is None]
            if keyless:
                conn.execute(
                    sa.update(t)
                    .where(self._one_of(t.c.seq, keyless), t.c.claim_token == token)
                    .values(claim_token=None, lease_until=None)
                )
            keys = {row.key for row in rows if row.key is not None}
            if keys:
                self._free_keys(conn, token, keys, now=now or _utcnow())
        return len(rows)

    def free_keys(self, freed: Mapping[uuid.UUID, Collection[str]], *, now: dt.datetime) -> int:
        """End the leases of claims on keys (keys by the token of the claim that leased them:
        their runs are done), in one transaction whatever the number of claims; drained keys
        are deleted. Returns how many keys their claims still held."""
        return self.end_runs(freed, now=now).ended

    def end_runs(
        self, freed: Mapping[uuid.UUID, Collection[str]], *, now: dt.datetime
    ) -> FreedKeys:
        """`free_keys`, also telling how many of the freed keys were kept (not drained: they
        have pending events, or a writer in progress), i.e. are worth a claim now. A drained
        key's next event brings its own NOTIFY (or the poll finds it)."""
        if not any(freed.values()):
            return NOTHING_FREED
        if not self._postgres:
            with self.transaction() as conn:
                return self._end_runs_sqlite(conn, freed, now)
        with self._driver() as cursor:
            self.transactions_total += 1
            results = self._script(cursor.connection, *self._end_runs_steps(freed, now))
        return self._freed_keys(results)

    def mark_and_end_runs(
        self,
        acked: Mapping[uuid.UUID, Collection[int]],
        freed: Mapping[uuid.UUID, Collection[str]],
        *,
        now: dt.datetime,
        delete: bool,
        relay: str | None = None,
    ) -> Written:
        """`mark_published`, then `end_runs`, in one transaction: what a batch of confirms
        writes. Returns how many rows their claims still owned, and the keys freed.

        The keys are freed with their events' marks or not at all, never before them (a
        claim of a key freed first would publish its events again), and a failed write
        leaves nothing to mark again (which would read as marks fenced off). On PostgreSQL
        one script (one round trip; `_script`), the marks first."""
        if not any(acked.values()) or not any(freed.values()):
            owned = self.mark_published(acked, now=now, delete=delete, relay=relay)
            return Written(owned, self.end_runs(freed, now=now))
        carried = Carried(acked, freed, delete, relay)
        if not self._postgres:
            with self.transaction() as conn:
                return self._write_sqlite(conn, carried, now)
        with self._driver() as cursor:
            self.transactions_total += 1
            results = self._script(cursor.connection, *self._write_steps(carried, now))
        return self._written(results)

    def _write_sqlite(self, conn: Connection, carried: Carried, now: dt.datetime) -> Written:
        """SQLite: `mark_and_end_runs` in the transaction of `conn`, the marks first."""
        owned = self._mark_sqlite(conn, carried.acked, now, carried.delete, carried.relay)
        return Written(owned, self._end_runs_sqlite(conn, carried.freed, now))

    def _write_steps(self, carried: Carried, now: dt.datetime) -> Script:
        """PostgreSQL: `mark_and_end_runs` as steps of a script (`_script`): the marks, if
        any, then `_end_runs_steps`, if any runs ended."""
        steps: list[tuple[str, str]] = []
        values: dict[str, dict[str, Any]] = {}
        if any(carried.acked.values()):
            mark = self._driver_statements[
                "_delete_published" if carried.delete else "_mark_published"
            ]
            steps.append(("mark", mark.sql))
            values["mark"] = mark.parameters(self._mark_values(carried.acked, now, carried.relay))
        if any(carried.freed.values()):
            end_steps, end_values = self._end_runs_steps(carried.freed, now)
            steps.extend(end_steps)
            values.update(end_values)
        return steps, values

    def _written(self, results: Mapping[str, StepResult]) -> Written:
        """What the steps of `_write_steps` did."""
        return Written(
            results["mark"].rowcount if "mark" in results else 0,
            self._freed_keys(results) if "end" in results else NOTHING_FREED,
        )

    def _end_runs_steps(
        self, freed: Mapping[uuid.UUID, Collection[str]], now: dt.datetime
    ) -> Script:
        """PostgreSQL: `end_runs` as two statements of a script (`_script`): end the leases
        and take the writers' locks it can, then delete the drained keys among those. Each
        statement of a script takes its own snapshot (READ COMMITTED), so the deletion sees
        every row committed by writers before their locks were taken, as `_drop_empty_keys`
        requires; the keys go from the first statement to the second through a
        transaction-local setting (`DRAINABLE_KEYS`)."""
        pairs = [(key, token) for token, keys in freed.items() for key in keys]
        given = {
            "keys": [key for key, _ in pairs],
            "tokens": [token for _, token in pairs],
            "now": now,
        }
        end = self._driver_statements["_end_leases_noting_lockable"]
        delete = self._driver_statements["_delete_drainable"]
        return (
            [("end", end.sql), ("delete", delete.sql)],
            {"end": end.parameters(given), "delete": delete.parameters(given)},
        )

    @staticmethod
    def _freed_keys(results: Mapping[str, StepResult]) -> FreedKeys:
        ended = int(results["end"].rows[0][0])
        return FreedKeys(ended, ended - results["delete"].rowcount)

    def _script(
        self,
        conn: psycopg.Connection[Any],
        steps: Sequence[tuple[str, str]],
        values: Mapping[str, Mapping[str, Any]],
        *,
        first: str = READ_COMMITTED,
        progress: Progress | None = None,
    ) -> dict[str, StepResult]:
        """Send `steps` (named statements) as one query, after `first` (by default the
        isolation level of its one implicit transaction): one round trip. Each step is bound
        on the client with the `values` of its name, if any (each on its own: statements
        compiled apart may give different values the same name), as psycopg would bind it
        (`relay.sql_literals`: its generic binding was a third of a claim's CPU). Returns
        what each step gave, by name (`run_script`, which also tells `progress`). A failing
        step fails the query and rolls back every step of its transaction."""
        bound = [
            ("first", first),
            *(
                (name, self._template(text).bind(values[name], conn) if name in values else text)
                for name, text in steps
            ),
        ]
        self._sent(conn, ";\n".join(text for _, text in bound), statements=len(bound))
        return run_script(conn, bound, progress=progress)

    def _template(self, text: str) -> LiteralTemplate:
        """`text` split at its placeholders, once per statement text (a fixed few)."""
        template = self._templates.get(text)
        if template is None:
            template = self._templates[text] = LiteralTemplate(text)
        return template

    @functools.cached_property
    def _end_leases(self) -> sa.Update:
        """PostgreSQL: end the lease of each key of the parameter `keys` that the claim of the
        same place in `tokens` still holds, and send it to the back of the line; returns those
        keys, each with whether this transaction took its writers' lock (try, never wait).

        With `_delete_drainable` after it in one script (`_end_runs_steps`), one round trip
        frees any number of keys and deletes the drained ones, where `_drop_empty_keys`
        takes four statements: the argument is the same.
        A key whose writers' lock this transaction could not take has a writer in progress
        and is kept. The others are locked here, a statement before the DELETE, so the
        DELETE's snapshot sees every row committed by writers before it; a writer that comes
        later waits for the lock and, after this commits, finds no key row and inserts it."""
        k = self.outbox.keys
        ending = (
            sa.func.unnest(
                sa.bindparam("keys", type_=postgresql.ARRAY(k.c.key.type)),
                sa.bindparam("tokens", type_=postgresql.ARRAY(k.c.lease_token.type)),
            )
            .table_valued("key", "token")
            .render_derived()
        )
        return (
            sa.update(k)
            .where(k.c.key == ending.c.key, k.c.lease_token == ending.c.token)
            .values(
                lease_token=None,
                leased_by=None,
                available_at=sa.bindparam("now", type_=k.c.available_at.type),
            )
            .returning(k.c.key, self._writers_lock.label("writers_locked"))
        )

    @functools.cached_property
    def _end_leases_noting_lockable(self) -> sa.Select[Any]:
        """PostgreSQL: `_end_leases`, keeping the keys whose writers' locks it took in the
        transaction-local setting `DRAINABLE_KEYS` (a text array: any key's characters
        survive it); returns how many leases it ended."""
        ended = self._end_leases.cte("ended")
        lockable = sa.func.array_agg(ended.c.key).filter(ended.c.writers_locked)
        return sa.select(sa.func.count(), _keep_in_setting(DRAINABLE_KEYS, lockable)).select_from(
            ended
        )

    @property
    def _writers_lock(self) -> sa.ColumnElement[bool]:
        """PostgreSQL: try (never wait for) the advisory lock writers of the key row's key hold
        from numbering their row until they commit (`outbox.ddl`)."""
        k = self.outbox.keys
        return sa.func.pg_try_advisory_xact_lock(
            sa.func.hashtextextended(k.c.key, self.outbox.key_lock_seed)
        )

    @functools.cached_property
    def _delete_drained(self) -> ReturningDelete[tuple[str]]:
        """Delete the rows of the parameter `keys` (on PostgreSQL, their writers' locks taken
        by an earlier statement of this transaction) that no pending event and no hold needs;
        returns the keys deleted."""
        k = self.outbox.keys
        if self._postgres:
            of_these = k.c.key == sa.any_(
                sa.bindparam("keys", type_=postgresql.ARRAY(k.c.key.type))
            )
        else:
            of_these = k.c.key.in_(sa.bindparam("keys", expanding=True))
        return self._delete_drained_of(of_these)

    @functools.cached_property
    def _delete_drainable(self) -> ReturningDelete[tuple[str]]:
        """PostgreSQL: `_delete_drained` of the keys in the setting `DRAINABLE_KEYS`."""
        k = self.outbox.keys
        keys = _read_from_setting(DRAINABLE_KEYS, k.c.key.type)
        return self._delete_drained_of(k.c.key == sa.any_(keys))

    def _delete_drained_of(self, of_these: sa.ColumnElement[bool]) -> ReturningDelete[tuple[str]]:
        k, t = self.outbox.keys, self.outbox.events
        # OFFSET 0 keeps the test a probe of each key's pending rows: pulled up into an anti
        # join, it walked the whole index of pending rows once per key whenever statistics
        # said pending rows were rare (a burst after a quiet time: 1.3 s for 100 keys with
        # 30,000 rows of one key pending).
        pending = (
            sa.select(sa.literal(1)).where(t.c.key == k.c.key, t.c.status == PENDING).offset(0)
        ).exists()
        return sa.delete(k).where(of_these, ~k.c.held, ~pending).returning(k.c.key)

    def _free_keys(
        self, conn: Connection, token: uuid.UUID, keys: Collection[str], *, now: dt.datetime
    ) -> tuple[int, int]:
        """SQLite, and `release`: free the keys `token` still holds; returns how many it held
        and how many of those were drained (deleted)."""
        k = self.outbox.keys
        held = list(
            conn.scalars(
                sa.select(k.c.key)
                .where(self._one_of(k.c.key, keys), k.c.lease_token == token)
                .with_for_update()
            )
        )
        if held:
            conn.execute(
                sa.update(k)
                .where(self._one_of(k.c.key, held))
                .values(lease_token=None, leased_by=None)
            )
            return len(held), len(self._drop_empty_keys(conn, held, now=now))
        return 0, 0

    def renew(
        self,
        tokens: Collection[uuid.UUID],
        lease_until: dt.datetime,
        *,
        keyless: Collection[int] = (),
    ) -> set[uuid.UUID]:
        """Extend the leases of `tokens` (their keys, and the rows `keyless` of events without
        a key); returns the tokens that still hold something."""
        if not tokens:
            return set()
        k, t = self.outbox.keys, self.outbox.events
        renewed = set(
            self._execute_alone(
                sa.update(k)
                .where(self._one_of(k.c.lease_token, tokens))
                .values(available_at=lease_until)
                .returning(k.c.lease_token)
            ).scalars()
        )
        if keyless:
            renewed.update(
                self._execute_alone(
                    sa.update(t)
                    .where(
                        self._one_of(t.c.seq, keyless),
                        self._one_of(t.c.claim_token, tokens),
                        _pending_by_seq(t),
                    )
                    .values(lease_until=lease_until)
                    .returning(t.c.claim_token)
                ).scalars()
            )
        return renewed

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
        self,
        *,
        name: str,
        host: str,
        pid: int,
        started_at: dt.datetime,
        now: dt.datetime,
        broker_node: str | None = None,
    ) -> None:
        r = self.outbox.relays
        with self.transaction() as conn:
            updated = conn.execute(
                sa.update(r)
                .where(r.c.name == name)
                .values(heartbeat_at=now, broker_node=broker_node)
            ).rowcount
            if not updated:
                conn.execute(
                    sa.insert(r).values(
                        name=name,
                        host=host,
                        pid=pid,
                        started_at=started_at,
                        heartbeat_at=now,
                        broker_node=broker_node,
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
        with self._kept_lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            try:
                conn.close()
            except Exception:
                log.debug("closing a kept connection failed", exc_info=True)
        self._local = threading.local()
        self.engine.dispose()

    def check(self) -> None:
        """Raise unless the database answers and holds a complete outbox of this version."""
        with self.transaction() as conn:
            result = schema_check(self.outbox, conn)
        if not result.ok:
            raise SchemaMissingError("; ".join(result.errors))
        for warning in result.warnings:
            log.warning("%s", warning)


def _locked_keys(results: Mapping[str, StepResult]) -> list[str]:
    """The keys a claim's first statement locked, in the order it locked them."""
    locked = results["lock"].rows
    return list(locked[0][0] or []) if locked else []


def _per_key(limit: int, keys: int, run_length: int) -> int:
    """The most rows a claim reads of each of its `keys` locked keys: `run_length`, or twice
    the key's even share of `limit` if that is less. Twice, so that rounds a key with fewer
    rows leaves can go to keys with more, while reading at most about twice `limit` rows."""
    share = -(-limit // max(1, keys))  # ceil
    return max(1, min(run_length, 2 * share))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _socket_fd(conn: Connection) -> int | None:
    driver = conn.connection.dbapi_connection
    pgconn = getattr(driver, "pgconn", None)
    try:
        return int(pgconn.socket) if pgconn is not None else None
    except Exception:
        return None


def _pooled(conn: Connection) -> bool:
    """Whether `conn` reaches the server through a pooler: the backend it says it talks to
    is not the one that answers (PgBouncer makes up the process id it hands out, for the
    cancel requests it forwards itself)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    answered = driver.execute("SELECT pg_backend_pid()").fetchone()
    return answered is None or answered[0] != driver.info.backend_pid


def _idle_and_open(conn: Connection) -> bool:
    """A kept connection looks usable: not closed, and (PostgreSQL) its socket has nothing to
    read. Between statements the server sends nothing unasked, so a readable socket means it
    ended the session (terminated, restarted, timed out): found with one system call, rather
    than by the next statement failing and the relay backing off for nothing."""
    if conn.closed or conn.invalidated:
        return False
    fd = _socket_fd(conn)
    if fd is None or fd < 0:
        return True  # SQLite, or no socket to look at
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


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
