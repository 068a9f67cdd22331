"""The relay daemon's store keeps its connections between statements (a pool checkout costs
about as much CPU as a statement), drops one that failed, and closes them all on close()."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from outbox import Outbox
from relay.errors import DatabaseUnavailableError
from relay.store import Store


def backend_pid(store: Store) -> int:
    with store.transaction() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def autocommit_pid(store: Store) -> int:
    return int(store._execute_alone(sa.select(sa.func.pg_backend_pid())).scalar_one())


def open_backends(engine: sa.Engine, pids: set[int]) -> set[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": list(pids)}
        )
        return {int(pid) for pid in rows.scalars()}


def test_kept_connections_are_reused_dropped_after_an_error_and_closed(
    pg_url: str, outbox_schema: Outbox
) -> None:
    engine = sa.create_engine(pg_url)
    store = Store(engine, outbox_schema, db_timeout=5, keep_connections=True)
    try:
        first = backend_pid(store)
        assert backend_pid(store) == first
        keeping = autocommit_pid(store)
        assert autocommit_pid(store) == keeping != first
        with pytest.raises(sa.exc.DataError), store.transaction() as conn:
            conn.exec_driver_sql("SELECT 1/0")
        after_error = backend_pid(store)
        assert after_error != first  # the failed connection was not reused
        assert open_backends(engine, {first}) == set()  # and it was closed
        store.close()
        assert open_backends(engine, {after_error, keeping}) == set()
        assert backend_pid(store) not in (first, after_error)  # usable after close()
    finally:
        store.close()
        engine.dispose()


def test_without_keeping_every_use_goes_back_to_the_pool(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=5)
    backend_pid(store)
    assert pg_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_kept_connection_that_cannot_connect_is_a_database_outage(
    outbox_schema: Outbox,
) -> None:
    engine = sa.create_engine("postgresql+psycopg://root@127.0.0.1:1/nowhere")
    store = Store(engine, outbox_schema, db_timeout=2, keep_connections=True)
    with pytest.raises(DatabaseUnavailableError):
        backend_pid(store)
    engine.dispose()


def test_a_kept_connection_the_server_ended_while_idle_is_replaced_before_use(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Terminated between two statements (an operator, a failover, idle_session_timeout): the
    next statement runs on a new session instead of failing and sending the relay into its
    outage backoff."""
    engine = sa.create_engine(pg_url)
    store = Store(engine, outbox_schema, db_timeout=5, keep_connections=True)
    try:
        first, first_autocommit = backend_pid(store), autocommit_pid(store)
        with pg_engine.connect() as conn:
            for pid in (first, first_autocommit):
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        deadline = time.monotonic() + 5
        while open_backends(pg_engine, {first, first_autocommit}) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend_pid(store) != first
        assert autocommit_pid(store) != first_autocommit
    finally:
        store.close()
        engine.dispose()
