"""Multi-host database URLs (a failover pair): the first address refuses connections, the
second is the real PostgreSQL. The relay's engine, its LISTEN connection and the CLI all start
on the second. Both URL forms psycopg takes through SQLAlchemy are covered: repeated `host=`
query parameters, and libpq's comma lists (`host=a,b&port=p,q`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.settings import RelaySettings
from tests.faults.runners import RelayThread
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import relay_env, write_events

pytestmark = pytest.mark.slow


def refusing_port() -> int:
    """A port nothing listens on (bound, then closed): connects are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multi_host_urls(pg_url: str) -> list[str]:
    url = sa.make_url(pg_url)
    closed = refusing_port()
    base = f"postgresql+psycopg://{url.username}@/{url.database}"
    return [
        f"{base}?host=127.0.0.1:{closed}&host={url.host}:{url.port}"
        "&target_session_attrs=read-write",
        f"{base}?host=127.0.0.1,{url.host}&port={closed},{url.port}"
        "&target_session_attrs=read-write",
    ]


def wait_for(condition: object, what: str, timeout: float = 20.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def sessions_named(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n")
        return int(conn.execute(query, {"n": name}).scalar_one())


@pytest.mark.parametrize("form", [0, 1], ids=["repeated-host", "libpq-lists"])
def test_relay_and_its_listen_connection_start_on_the_second_host(
    pg_url: str,
    pg_engine: sa.Engine,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
    form: int,
) -> None:
    tap, exchange = tapped_exchange
    database_url = multi_host_urls(pg_url)[form]
    settings = RelaySettings(
        database_url=database_url,
        amqp_url=amqp_url,
        schema=outbox_schema.schema,
        exchange=exchange,
        name=unique_name("relay"),
        listen=True,
        # Long: only a NOTIFY wakes the relay soon once the table was found idle.
        poll_interval=60.0,
    )
    with RelayThread(settings) as relay:
        wait_for(
            lambda: sessions_named(pg_engine, f"outbox-relay:{settings.name}:listen") == 1,
            "the LISTEN session",
        )
        events = [Event(type="order.placed", key=f"k{n % 3}") for n in range(10)]
        write_events(pg_engine, outbox_schema, events)
        received = tap.drain(expected=10, timeout=20)
        assert {d.message_id for d in received} == {str(e.id) for e in events}
        assert sessions_named(pg_engine, f"outbox-relay:{settings.name}") >= 1
        relay.assert_running()


def test_cli_works_with_a_multi_host_url(pg_url: str, outbox_schema: Outbox) -> None:
    for database_url in multi_host_urls(pg_url):
        result = subprocess.run(
            [sys.executable, "-m", "relay.cli", "status", "--json"],
            env=relay_env(
                {"OUTBOX_DATABASE_URL": database_url, "OUTBOX_SCHEMA": str(outbox_schema.schema)}
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert '"pending": 0' in result.stdout, result.stdout
