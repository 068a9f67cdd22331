"""The store's hot statements on psycopg directly (`relay.driver_sql`): the same statements,
transactions and errors as through SQLAlchemy, on PostgreSQL.

What the argument of `relay.driver_sql` assumes, each tested here: a parameter the caller
forgets is an error (not a NULL); a failed statement leaves nothing of its transaction; the
driver's errors read as SQLAlchemy's would (an outage, a missing schema); the statement text
is quoted by the dialect like any other (mixed case, reserved words).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.driver_sql import DriverStatement, run_script
from relay.errors import DatabaseUnavailableError, SchemaMissingError
from relay.records import Claim
from relay.store import FreedKeys, Store, create_engine
from tests.support.relays import write_events
from tests.support.sessions import terminate_pooled_sessions


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def claim(store: Store, limit: int = 10) -> Claim:
    moment = now()
    return store.claim(
        owner="r",
        limit=limit,
        run_length=10,
        lease_until=moment + dt.timedelta(seconds=30),
        now=moment,
    )


def test_a_parameter_left_out_is_an_error_not_a_null(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    statement = DriverStatement(store._end_leases, pg_engine.dialect)
    with pytest.raises(TypeError, match=r"missing: \['now'\]"):
        statement.parameters({"keys": [], "tokens": []})
    # Values the statement carries itself (the NULLs it writes, the lock seed) are filled in.
    values = statement.parameters({"keys": ["k"], "tokens": [uuid.uuid4()], "now": now()})
    assert values["lease_token"] is None and isinstance(values["hashtextextended_1"], int)


class _Failing(DriverStatement):
    """A statement that fails on the server (division by zero)."""

    def __init__(self) -> None:
        self.sql = "SELECT 1 / 0"
        self.columns = ()

    def parameters(self, given: object) -> dict[str, object]:
        return {}


@pytest.mark.parametrize("write", ["end_runs", "mark_and_end_runs"])
def test_a_failing_step_of_a_write_leaves_nothing_of_it(
    pg_engine: sa.Engine, outbox_schema: Outbox, write: str
) -> None:
    """A write of results is one script (one transaction): its leases end in its first
    statements and drained keys go in its last; when the last fails, the marks and the
    ended leases are rolled back with it, and the kept connection serves the next call."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    store = Store(pg_engine, outbox_schema, db_timeout=10, keep_connections=True)
    claimed = claim(store)
    acked = {claimed.token: [e.seq for e in claimed.events]}
    freed = {claimed.token: {"k"}}

    def run() -> FreedKeys:
        if write == "end_runs":
            return store.end_runs(freed, now=now())
        owned, ended = store.mark_and_end_runs(acked, freed, now=now(), delete=False)
        assert owned == 1
        return ended

    real = store._driver_statements["_delete_drainable"]
    store._driver_statements["_delete_drainable"] = _Failing()
    with pytest.raises(sa.exc.DataError):
        run()
    k, t = outbox_schema.keys, outbox_schema.events
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(k.c.lease_token)).scalar_one() == claimed.token
        assert conn.execute(sa.select(t.c.status)).scalar_one() == "pending"
    store._driver_statements["_delete_drainable"] = real
    # Without its mark (end_runs alone), the event keeps its key.
    drained = write == "mark_and_end_runs"
    assert run() == FreedKeys(ended=1, kept=0 if drained else 1)
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(k)).scalar() == (not drained)
    store.close()


def test_a_write_of_confirms_is_one_query(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    """The marks, the ends of the runs and the deletion of drained keys go to the server as
    one query: key `a` keeps events (kept), `b` drains (deleted)."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "aab"])
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    moment = now()
    claimed = store.claim(
        owner="r", limit=10, run_length=1, lease_until=moment + dt.timedelta(seconds=30), now=moment
    )
    sent: list[str] = []
    store.statement_observers.append(lambda conn, sql: sent.append(sql))
    owned, freed = store.mark_and_end_runs(
        {claimed.token: [e.seq for e in claimed.events]},
        {claimed.token: {"a", "b"}},
        now=now(),
        delete=False,
    )
    assert (owned, freed) == (2, FreedKeys(ended=2, kept=1))
    assert len(sent) == 1
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(outbox_schema.keys.c.key)).scalars().all() == ["a"]
        statuses = conn.execute(
            sa.select(outbox_schema.events.c.status).order_by(outbox_schema.events.c.seq)
        )
        assert statuses.scalars().all() == ["published", "pending", "published"]


def test_a_killed_session_reads_as_an_outage_on_every_hot_statement(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    store = Store(engine, outbox_schema, db_timeout=10)
    calls = {
        "claim": lambda: claim(store),
        "has_ready": lambda: store.has_ready(now()),
        "mark_published": lambda: store.mark_published(
            {uuid.uuid4(): [1]}, now=now(), delete=False
        ),
        "free_keys": lambda: store.free_keys({uuid.uuid4(): {"k"}}, now=now()),
        "mark_and_end_runs": lambda: store.mark_and_end_runs(
            {uuid.uuid4(): [1]}, {uuid.uuid4(): {"k"}}, now=now(), delete=False
        ),
    }
    try:
        for name, call in calls.items():
            terminate_pooled_sessions(engine, pg_engine)  # the pool's only connection
            with pytest.raises(DatabaseUnavailableError):
                call()
            call()  # the dead connection was discarded: the next call reconnects
            assert name
    finally:
        engine.dispose()


def test_a_missing_outbox_reads_as_a_missing_schema(pg_engine: sa.Engine, schema_name: str) -> None:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema_name}"')
    store = Store(pg_engine, Outbox(schema=schema_name), db_timeout=10)
    moment = now()
    with pytest.raises(SchemaMissingError, match="init-db"):
        store.claim(owner="r", limit=10, run_length=10, lease_until=moment, now=moment)
    with pytest.raises(SchemaMissingError):
        store.has_ready(moment)


@pytest.mark.parametrize("write", ["apart", "in one script"])
def test_names_that_need_quoting_on_the_driver_path(
    pg_engine: sa.Engine, quoted_outbox: Outbox, write: str
) -> None:
    """Mixed case and a reserved word for table and schema, keys of 255 bytes and with
    characters a text array quotes (through the setting of the write's script too)."""
    box = quoted_outbox
    keys = ["é" * 127 + "x", 'quote"s', "k", "a,b {}", "back\\slash", "NULL"]
    write_events(pg_engine, box, [Event(type="t", key=key) for key in keys for _ in range(2)])
    store = Store(pg_engine, box, db_timeout=10)
    assert store.has_ready(now())
    claimed = claim(store, limit=2 * len(keys))
    assert sorted({e.key for e in claimed.events}) == sorted(keys)
    acked = {claimed.token: [e.seq for e in claimed.events]}
    freed = {claimed.token: set(keys)}
    if write == "apart":
        assert store.mark_published(acked, now=now(), delete=False) == 2 * len(keys)
        assert store.free_keys(freed, now=now()) == len(keys)
    else:
        owned, ended = store.mark_and_end_runs(acked, freed, now=now(), delete=False)
        assert (owned, ended) == (2 * len(keys), FreedKeys(ended=len(keys), kept=0))
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(box.keys)).scalar() == 0


def test_the_driver_connection_is_psycopg(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    """The assumption the driver path stands on: SQLAlchemy's connection wraps psycopg 3."""
    with pg_engine.connect() as conn:
        assert isinstance(conn.connection.driver_connection, psycopg.Connection)


@pytest.mark.parametrize("keep", [False, True])
def test_a_claim_that_fails_after_its_read_leaves_nothing_locked_or_leased(
    pg_engine: sa.Engine, outbox_schema: Outbox, keep: bool
) -> None:
    """The claim is one script in one implicit transaction: when a statement after its read
    fails (the keys locked, events and keys leased), the locks and leases end with it."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k"), Event(type="t")])
    store = Store(pg_engine, outbox_schema, db_timeout=10, keep_connections=keep)
    real = store._claim_script

    def failing(read: Any) -> list[tuple[str, str]]:
        return [*real(read), ("fail", "SELECT 1 / 0")]

    store._claim_script = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(sa.exc.DataError):
            claim(store)
        other = Store(pg_engine, outbox_schema, db_timeout=10)
        k = outbox_schema.keys
        with pg_engine.connect() as conn:
            assert conn.execute(sa.select(k.c.lease_token)).scalar_one() is None
        assert sorted(e.key or "" for e in claim(other).events) == ["", "k"]
    finally:
        store.close()


def test_a_server_restart_costs_one_failed_call_not_one_per_pooled_connection(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """As through SQLAlchemy: the first disconnect invalidates the pool's older connections,
    so the next call reconnects rather than meeting the next dead one."""
    engine = sa.create_engine(pg_url, pool_size=3, max_overflow=0)
    store = Store(engine, outbox_schema, db_timeout=10)
    terminate_pooled_sessions(engine, pg_engine, count=3)
    failures = 0
    try:
        for _ in range(4):
            try:
                store.has_ready(now())
            except DatabaseUnavailableError:
                failures += 1
    finally:
        engine.dispose()
    assert failures == 1


def test_ending_runs_tells_the_keys_kept_from_the_drained(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """What the relay claims again at once: keys freed with events left (here `a`), not
    keys drained and deleted (`b`)."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "aab"])
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    moment = now()
    claimed = store.claim(
        owner="r", limit=10, run_length=1, lease_until=moment + dt.timedelta(seconds=30), now=moment
    )
    assert (
        store.mark_published(
            {claimed.token: [e.seq for e in claimed.events]}, now=now(), delete=False
        )
        == 2
    )
    assert store.end_runs({claimed.token: {"a", "b"}}, now=now()) == FreedKeys(ended=2, kept=1)
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(outbox_schema.keys.c.key)).scalars().all() == ["a"]


def test_the_relays_transactions_read_committed_whatever_the_databases_default(
    pg_url: str,
) -> None:
    """The claim and the writes of results rely on each statement of a transaction taking
    its own snapshot (READ COMMITTED): under a database default of REPEATABLE READ, a
    writer's event committed during a write of confirms lost its key row and was stranded
    (found by review). The relay's scripts and transactions set their own level."""
    name = f"outbox_rr_{uuid.uuid4().hex[:8]}"
    admin = sa.make_url(pg_url).set(drivername="postgresql", database="postgres")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(
            f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
        )
    url = sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, application_name="outbox-relay:test", db_timeout=10)
    store = Store(engine, Outbox(), db_timeout=10)
    show = "SHOW transaction_isolation"
    try:
        with store._driver() as cursor:
            results = store._script(cursor.connection, [("level", show)], {})
        assert results["level"].rows == [("read committed",)]
        with store.transaction() as conn:
            assert conn.exec_driver_sql(show).scalar() == "read committed"
        with store._autocommit.connect() as conn:  # statements sent alone
            assert conn.exec_driver_sql(show).scalar() == "read committed"
        plain = sa.create_engine(sa.make_url(pg_url).set(database=name))
        with plain.connect() as conn:  # the database's own default, for any other session
            assert conn.exec_driver_sql(show).scalar() == "repeatable read"
        plain.dispose()
    finally:
        store.close()
        engine.dispose()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}"')


def test_a_script_answered_with_too_few_results_is_an_error_not_the_last_rows_again(
    pg_engine: sa.Engine, outbox_schema: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of a script reads its own result; were one missing, reading on would have
    given the next step the rows of another (here the claim's read, its rows taken for a
    step before it)."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="a")])
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    real = store._claim_script

    def with_a_step_that_answers_nothing(read: Any) -> list[tuple[str, str]]:
        steps = real(read)
        return [
            *steps[:-1],
            ("nothing", "-- a statement the server gives no result for"),
            steps[-1],
        ]

    monkeypatch.setattr(store, "_claim_script", with_a_step_that_answers_nothing)
    with pytest.raises(RuntimeError, match="no result for the step 'read'"):
        claim(store)


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ([("one", "SELECT 1"), ("two", "-- nothing")], "no result for the step 'two'"),
        ([("one", "SELECT 1; SELECT 2")], "more results than the script has steps"),
    ],
)
def test_a_script_whose_results_do_not_match_its_steps_fails_and_leaves_the_session_usable(
    pg_url: str, steps: list[tuple[str, str]], error: str
) -> None:
    dsn = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as driver:
        with pytest.raises(RuntimeError, match=error):
            run_script(driver, steps)
        assert run_script(driver, [("three", "SELECT 3")])["three"].rows == [(3,)]


def test_a_failing_progress_callback_is_raised_after_the_rest_and_leaves_no_aborted_transaction(
    pg_url: str,
) -> None:
    """The callback fails after the first step; a later step fails on the server inside an
    explicit transaction. The callback's error is raised (it came first), once every result is
    read, and the session is not left in the aborted transaction."""
    dsn = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    told: list[str] = []

    def progress(step: str, so_far: Any) -> None:
        told.append(step)
        if step == "begin":
            raise ValueError("the caller failed")

    steps = [("begin", "BEGIN"), ("one", "SELECT 1"), ("boom", "SELECT 1/0"), ("end", "COMMIT")]
    with psycopg.connect(dsn, autocommit=True) as driver:
        with pytest.raises(ValueError, match="the caller failed"):
            run_script(driver, steps, progress=progress)
        assert told == ["begin"]
        assert driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert run_script(driver, [("two", "SELECT 2")])["two"].rows == [(2,)]
