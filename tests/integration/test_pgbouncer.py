"""The relay, its commands and the consumer's engine behind a real PgBouncer in transaction
mode (the pooler the README names): each transaction may run on another server session.

What that breaks, each checked here: PgBouncer refuses the startup parameter `options`
(which carries the relay's session settings), so a relay that insisted on it could not
connect at all; and a statement psycopg prepares on one server session does not exist on
the next ("prepared statement _pg3_0 does not exist"), so nothing may rely on psycopg's own
prepared statements. The claim's read, prepared by name on the session, finds itself
missing and is then sent whole (`Store._claim_postgres`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import Event, Outbox
from relay.cli import main
from relay.consumer.app import create_engine as consumer_engine
from relay.store import create_engine
from tests.integration.test_relay_delivery import settings_for
from tests.support.history import check_history
from tests.support.pgbouncer import pgbouncer
from tests.support.rabbit import QueueTap
from tests.support.relays import (
    count_by_status,
    interleaved_events,
    relay_thread,
    write_events,
    written,
)


@pytest.fixture(scope="module")
def pooled_url(pg_url: str) -> Iterator[str]:
    try:
        with pgbouncer(sa.make_url(pg_url).database or "test") as url:
            yield url
    except FileNotFoundError as exc:  # pragma: no cover - .ci/services installs it
        pytest.skip(str(exc))


def setting(engine: sa.Engine, name: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(f"SHOW {name}").scalar())


def test_the_relays_engine_connects_through_pgbouncer_and_says_what_it_could_not_set(
    pooled_url: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Directly, the session settings are there; through PgBouncer, which refuses them, the
    engine connects without them and says once what to set instead."""
    direct = create_engine(pg_url, application_name="t", db_timeout=7)
    pooled = create_engine(pooled_url, application_name="t", db_timeout=7)
    try:
        assert setting(direct, "statement_timeout") == "7s"
        with caplog.at_level(logging.WARNING, logger="relay.store"):
            assert setting(pooled, "statement_timeout") == "0"
            pooled.dispose()
            assert setting(pooled, "synchronous_commit") == "on"  # a new connection
        (warning,) = [r for r in caplog.records if "startup parameter" in r.getMessage()]
        assert "ALTER ROLE" in warning.getMessage() and "--no-listen" in warning.getMessage()
    finally:
        direct.dispose()
        pooled.dispose()


def test_the_urls_own_options_are_kept_beside_the_relays(pg_url: str) -> None:
    """`?options=` in the URL (a search_path, say) is kept; the relay's settings come after
    it and win where both set the same one."""
    url = f"{pg_url}?options=-csearch_path%3Dsomewhere%20-cstatement_timeout%3D1000"
    engine = create_engine(url, application_name="t", db_timeout=7)
    try:
        assert setting(engine, "search_path") == "somewhere"
        assert setting(engine, "statement_timeout") == "7s"
    finally:
        engine.dispose()


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
    """Writers and two relays (no LISTEN, as the README says) through one PgBouncer with
    four server sessions: every event once, each key in order, and no database error on the
    way (a relay that met one would have logged it as an outage and tried again)."""
    tap, exchange = tapped_exchange
    pooled = sa.create_engine(pooled_url, connect_args={"prepare_threshold": None})
    try:
        with caplog.at_level(logging.WARNING):
            settings = settings_for(
                pooled_url, amqp_url, outbox_schema, exchange, listen=False, poll_interval=0.2
            )
            with relay_thread(settings), relay_thread(settings.replace(name=settings.name + "b")):
                write_events(pooled, outbox_schema, interleaved_events(3_000, keys=50), 50)
                deliveries = tap.drain(expected=3_000, timeout=20)
    finally:
        pooled.dispose()
    check_history(written(pg_engine, outbox_schema), deliveries).assert_ok(max_duplicates=0)
    assert count_by_status(pg_engine, outbox_schema) == {"published": 3_000}
    expected = ("startup parameter", "claim's prepared statement did not stay")
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
