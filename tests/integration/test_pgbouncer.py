"""The relay, its commands and the consumer's engine behind a real PgBouncer in transaction
mode (the pooler the README names): each transaction may run on another server session.

What that breaks, each checked here: PgBouncer refuses the startup parameter `options`
(which carries the relay's session settings), or drops it without a word when configured to
(`ignore_startup_parameters = options`); so a relay that insisted on it could not connect,
and one that did not look would lose the URL's own options (a `search_path`: another
outbox) unawares. A statement psycopg prepares on one server session does not exist on the
next ("prepared statement _pg3_0 does not exist"), so nothing may rely on psycopg's own
prepared statements; the claim's read, prepared by name on the session, finds itself
missing and is then sent whole (`Store._claim_postgres`). A LISTEN stays on a pooled server
session and its notifications reach other clients: the listener must find out and never
LISTEN there.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import Event, Outbox
from relay.cli import main
from relay.consumer.app import create_engine as consumer_engine
from relay.demo import ensure_database
from relay.errors import ConfigError, DatabaseUnavailableError
from relay.listener import Listener, psycopg_dsn
from relay.session_options import SESSION_MARK, arrived, marker
from relay.store import Store, _pooled, create_engine
from tests.integration.test_relay_delivery import settings_for
from tests.support.history import check_history
from tests.support.loops import running_loop
from tests.support.pgbouncer import pgbouncer
from tests.support.rabbit import QueueTap
from tests.support.relays import (
    count_by_status,
    interleaved_events,
    relay_thread,
    write_events,
    written,
)


def _bouncer(pg_url: str, *, ignore_options: bool) -> Iterator[str]:
    try:
        with pgbouncer(
            sa.make_url(pg_url).database or "test", ignore_options=ignore_options
        ) as url:
            yield url
    except FileNotFoundError as exc:  # pragma: no cover - .ci/services installs it
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pooled_url(pg_url: str) -> Iterator[str]:
    """Through a PgBouncer that refuses `options`."""
    yield from _bouncer(pg_url, ignore_options=False)


@pytest.fixture(scope="module")
def ignoring_url(pg_url: str) -> Iterator[str]:
    """Through a PgBouncer that drops `options` without a word."""
    yield from _bouncer(pg_url, ignore_options=True)


@pytest.fixture(params=["refusing", "ignoring"])
def any_pooled_url(request: pytest.FixtureRequest) -> str:
    return str(
        request.getfixturevalue("pooled_url" if request.param == "refusing" else "ignoring_url")
    )


def setting(engine: sa.Engine, name: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(f"SHOW {name}").scalar())


def test_the_relays_engine_connects_through_pgbouncer_and_says_what_it_could_not_set(
    any_pooled_url: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Directly, the session settings are there; through PgBouncer, which refuses them or
    drops them, the engine connects without them and says once what to set instead
    (never the URL's secrets)."""
    direct = create_engine(pg_url, application_name="t", db_timeout=7)
    pooled = create_engine(
        f"{any_pooled_url}?sslpassword=topsecret", application_name="t", db_timeout=7
    )
    try:
        assert setting(direct, "statement_timeout") == "7s"
        with caplog.at_level(logging.WARNING, logger="relay.store"):
            assert setting(pooled, "statement_timeout") == "0"
            pooled.dispose()
            assert setting(pooled, "synchronous_commit") == "on"  # a new connection
        (warning,) = [
            r.getMessage() for r in caplog.records if "session settings" in r.getMessage()
        ]
        assert "ALTER ROLE" in warning and "default_transaction_isolation" in warning
        assert "topsecret" not in warning
    finally:
        direct.dispose()
        pooled.dispose()


def test_the_urls_own_options_are_kept_beside_the_relays(pg_url: str) -> None:
    """`?options=` in the URL (a search_path, say; several of them; one ending in a lone
    backslash) are kept; the relay's settings come after them and win where both set the
    same one. The listener's and the consumer's connections get the same options."""
    url = (
        f"{pg_url}?options=-csearch_path%3Dsomewhere%20-cstatement_timeout%3D1000"
        "&options=-cwork_mem%3D64MB%5C"
    )
    engine = create_engine(url, application_name="t", db_timeout=7)
    consumer = consumer_engine(url, application_name="t")
    try:
        for each in (engine, consumer):
            assert setting(each, "search_path") == "somewhere"
            assert setting(each, "work_mem") == "64MB"
        assert setting(engine, "statement_timeout") == "7s"
        with psycopg.connect(psycopg_dsn(url)) as conn:
            assert conn.execute("SHOW search_path").fetchone() == ("somewhere",)
            assert conn.execute("SHOW work_mem").fetchone() == ("64MB",)
    finally:
        engine.dispose()
        consumer.dispose()


def test_the_urls_own_options_behind_pgbouncer_are_an_error_not_another_outbox(
    any_pooled_url: str, pg_engine: sa.Engine, schema_name: str
) -> None:
    """PgBouncer cannot pass the URL's `?options=-csearch_path=app` on (nor PGOPTIONS): the
    relay would have worked on the outbox of the default search path (found by review: it
    published another outbox's events). It stops with a configuration error saying what to
    do instead (exit 2, not an outage to retry); so do `status` and the consumer's engine."""
    Outbox(schema=schema_name).create(pg_engine)
    url = f"{any_pooled_url}?options=-csearch_path%3D{schema_name}"
    for engine in (
        create_engine(url, application_name="t", db_timeout=7),
        consumer_engine(url, application_name="t"),
    ):
        try:
            with pytest.raises(ConfigError, match="take them out of the URL"), engine.connect():
                pass
        finally:
            engine.dispose()
    for env in (
        {"OUTBOX_DATABASE_URL": url},
        {"OUTBOX_DATABASE_URL": any_pooled_url, "PGOPTIONS": f"-csearch_path={schema_name}"},
    ):
        status = CliRunner().invoke(main, ["status"], env=env)
        assert status.exit_code == 2, status.output
        assert "take them out of the URL" in status.output, status.output


def test_pgoptions_are_kept_like_the_urls_own(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq's PGOPTIONS: the options the relay gives libpq would replace them (found by
    review); they are kept as the URL's would be."""
    monkeypatch.setenv("PGOPTIONS", "-csearch_path=fromenv")
    engine = create_engine(pg_url, application_name="t", db_timeout=7)
    try:
        assert setting(engine, "search_path") == "fromenv"
        assert setting(engine, "statement_timeout") == "7s"
    finally:
        engine.dispose()


@pytest.mark.parametrize("connection", ["first", "later"])
def test_the_check_of_a_new_connection_waits_no_longer_than_the_database_deadline(
    connection: str, pooled_url: str, outbox_schema: Outbox
) -> None:
    """Every server session of the PgBouncer is held in an open transaction: a new
    connection's first query waits in PgBouncer's queue (120 s by default). The check of its
    settings goes first, before the store's deadline watchdog guards the connection and, on
    an engine's first connection, before SQLAlchemy's own first queries, and bounds its own
    wait: an outage after the database deadline, not a relay stuck in silence (found by
    review: 30 s, and a daemon that ignored SIGTERM; then 120 s for a first connection)."""
    engine = create_engine(pooled_url, application_name="t", db_timeout=1)
    store = Store(engine, outbox_schema, db_timeout=1)
    if connection == "later":
        store.has_ready(dt.datetime.now(dt.UTC))  # the engine's first connection, then none
        store.close()
        engine.dispose()
    holding = [
        sa.create_engine(pooled_url, connect_args={"prepare_threshold": None}) for _ in range(4)
    ]
    holders = [each.connect() for each in holding]
    try:
        for holder in holders:
            holder.exec_driver_sql("SELECT 1")  # each holds a server session from now on
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match="in time"):
            store.has_ready(dt.datetime.now(dt.UTC))
        assert time.monotonic() - started < 5
    finally:
        for holder in holders:
            holder.close()
        for each in holding:
            each.dispose()
        store.close()
        engine.dispose()


def test_the_demos_database_check_says_pgoptions_cannot_pass_pgbouncer(
    pooled_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`demo` makes its database with a connection of its own, which libpq gives PGOPTIONS:
    refused by PgBouncer, that is the configuration error too, not an outage (found by
    review: exit 3 with the raw refusal)."""
    monkeypatch.setenv("PGOPTIONS", "-csearch_path=elsewhere")
    with pytest.raises(ConfigError, match="take them out of the URL"):
        ensure_database(pooled_url)


def test_the_listener_never_listens_through_pgbouncer(
    any_pooled_url: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A LISTEN through PgBouncer stays on a pooled server session after the client is gone
    and its notifications reach other clients, where they pile up unread (found by review):
    the listener finds out on connecting, never LISTENs, and says so. Directly, it listens."""
    with caplog.at_level(logging.WARNING, logger="relay.listener"), running_loop() as loop:
        for url, pooled in ((any_pooled_url, True), (pg_url, False)):
            listener = Listener(
                url, "outbox_test_channel", lambda: None, loop=loop, application_name="t"
            )
            listener.start()
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not (
                    listener.behind_pooler or listener.connections_total
                ):
                    time.sleep(0.02)
            finally:
                listener.stop()
            assert listener.behind_pooler is pooled
            assert listener.connections_total == (0 if pooled else 1)
    (warning,) = [r.getMessage() for r in caplog.records if "LISTEN turned off" in r.getMessage()]
    assert "--no-listen" in warning


def test_no_statement_of_the_relays_engines_is_prepared_by_psycopg(
    pooled_url: str, pg_url: str
) -> None:
    """Fifteen sessions through four server sessions, each running one statement fifty
    times: psycopg, left to itself, prepares it after five and then fails on another
    server session. Neither the relay's engine nor the consumer's may."""
    for engine in (
        create_engine(pooled_url, application_name="t", db_timeout=7),
        consumer_engine(pooled_url, application_name="t", threads=15),
    ):
        errors: list[BaseException] = []

        def run(engine: sa.Engine = engine, errors: list[BaseException] = errors) -> None:
            try:
                with engine.connect() as conn:
                    for i in range(50):
                        conn.exec_driver_sql("SELECT %(i)s::int + 1", {"i": i}).scalar()
                        conn.commit()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(15)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        engine.dispose()
        assert not errors, errors[0]


def test_two_relays_behind_pgbouncer_deliver_everything_once_in_key_order(
    pooled_url: str,
    pg_engine: sa.Engine,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writers and two relays (one without LISTEN, as the README says, one with it, which
    turns it off) through one PgBouncer with four server sessions: every event once, each
    key in order, and no database error on the way (a relay that met one would have logged
    it as an outage and tried again)."""
    tap, exchange = tapped_exchange
    pooled = sa.create_engine(pooled_url, connect_args={"prepare_threshold": None})
    try:
        with caplog.at_level(logging.WARNING):
            settings = settings_for(
                pooled_url, amqp_url, outbox_schema, exchange, listen=False, poll_interval=0.2
            )
            # The second as started by someone who did not read the README: LISTEN on.
            listening = settings.replace(name=settings.name + "b", listen=True)
            with relay_thread(settings), relay_thread(listening):
                write_events(pooled, outbox_schema, interleaved_events(3_000, keys=50), 50)
                deliveries = tap.drain(expected=3_000, timeout=20)
    finally:
        pooled.dispose()
    check_history(written(pg_engine, outbox_schema), deliveries).assert_ok(max_duplicates=0)
    assert count_by_status(pg_engine, outbox_schema) == {"published": 3_000}
    expected = ("session settings", "LISTEN turned off", "claim's prepared statement did not stay")
    unexpected = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not any(text in r.getMessage() for text in expected)
    ]
    assert not unexpected, unexpected


def test_the_commands_work_through_pgbouncer(pooled_url: str, schema_name: str) -> None:
    """`init-db`, `status` and `dead list`, as an operator behind PgBouncer runs them."""
    runner = CliRunner()
    env = {"OUTBOX_DATABASE_URL": pooled_url, "OUTBOX_SCHEMA": schema_name}
    created = runner.invoke(main, ["init-db"], env=env)
    assert created.exit_code == 0, created.output
    engine = sa.create_engine(pooled_url, connect_args={"prepare_threshold": None})
    try:
        write_events(engine, Outbox(schema=schema_name), [Event(type="t", key="k")])
    finally:
        engine.dispose()
    status = runner.invoke(main, ["status"], env=env)
    assert status.exit_code == 0, status.output
    assert "pending              1" in status.output
    dead = runner.invoke(main, ["dead", "list"], env=env)
    assert dead.exit_code == 0, dead.output


def test_a_database_default_of_the_marker_never_passes_for_it(pg_url: str) -> None:
    """The marker's value is new for each engine: a session that has the setting from
    elsewhere (a database or role default, a leftover SET on a pooled session) is not taken
    for one that got the relay's options (found by review)."""
    with psycopg.connect(
        psycopg_dsn(pg_url), options=f"-c {SESSION_MARK}=on", autocommit=True
    ) as conn:
        assert not arrived(conn, marker(), 5)
        assert arrived(conn, "on", 5)


def test_a_check_that_meets_an_error_leaves_no_command_half_read(
    pg_url: str, pg_engine: sa.Engine
) -> None:
    """The session ends under the check (terminated): the error is raised, and the
    connection is not left in the middle of a command (found by review: psycopg then said
    "another command is already in progress" on the next call)."""
    with psycopg.connect(psycopg_dsn(pg_url), autocommit=True) as conn:
        pid = conn.info.backend_pid
        with pg_engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError):
            arrived(conn, marker(), 5)
        assert conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE
        with pytest.raises(psycopg.OperationalError) as next_call:
            conn.execute("SELECT 1")
        assert "another command is already in progress" not in str(next_call.value)


def test_the_check_works_past_1024_open_descriptors(pg_url: str) -> None:
    """select() cannot watch a descriptor of 1,024 or more; the check polls (found by
    review: every connection failed in a process with that many open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        engine = create_engine(pg_url, application_name="t", db_timeout=5)
        try:
            with engine.connect() as conn:
                fd = conn.connection.driver_connection.fileno()  # type: ignore[union-attr]
                assert fd >= 1024
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
        finally:
            engine.dispose()
    finally:
        for each in spare:
            os.close(each)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_libpq_services_options_are_kept(
    pg_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL naming a libpq service whose file sets options: kept, the relay's after them."""
    database = sa.make_url(pg_url).database
    services = tmp_path / "pg_service.conf"
    services.write_text(
        f"[outbox]\nhost=127.0.0.1\nport=5432\nuser=root\ndbname={database}\n"
        "options=-csearch_path=fromservice\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    engine = create_engine(
        "postgresql+psycopg://?service=outbox", application_name="t", db_timeout=7
    )
    try:
        assert setting(engine, "search_path") == "fromservice"
        assert setting(engine, "statement_timeout") == "7s"
    finally:
        engine.dispose()


def test_a_relay_behind_pgbouncer_never_claims_on_its_loops_thread(
    any_pooled_url: str,
    pg_engine: sa.Engine,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A claim's cancel at its deadline goes to the pooler, which may hand it to another
    client's session: behind one, claims stay on the claim thread (the connections opened
    for the loop lack the session's settings, and are closed at once)."""
    tap, exchange = tapped_exchange
    settings = settings_for(any_pooled_url, amqp_url, outbox_schema, exchange, listen=False)
    threads: list[str] = []
    with caplog.at_level(logging.INFO), relay_thread(settings) as relay:
        relay.store.statement_observers.append(
            lambda _conn, statement: (
                threads.append(threading.current_thread().name)
                if "SKIP LOCKED" in statement
                else None
            )
        )
        for n in range(1, 6):
            write_events(pg_engine, outbox_schema, [Event(type="order.placed", key=f"k{n}")])
            assert len(tap.drain(expected=n, timeout=10)) == n
            time.sleep(0.05)
        assert not relay.store.claims_here_supported
    assert threads and set(threads) == {"relay-db"}, threads
    assert "claims stay on the claim thread" in caplog.text


def test_a_connection_through_pgbouncer_is_seen_as_pooled_whatever_its_options(
    pg_url: str, any_pooled_url: str
) -> None:
    """The second sign, for a pooler that would pass the session's settings on: the
    backend a connection says it talks to is not the one that answers."""
    for url, pooled in ((pg_url, False), (any_pooled_url, True)):
        engine = create_engine(url, application_name="test-pooled", db_timeout=5)
        try:
            with engine.connect() as conn:
                assert _pooled(conn) is pooled, url
        finally:
            engine.dispose()
