"""`outbox-relay` as real processes on the real PostgreSQL and RabbitMQ: a dead letter made by
an unroutable routing key is listed, shown, requeued once the queue is bound, and arrives with
its original message_id; the demo passes; startup errors exit with their documented codes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from tests.faults.runners import RelayProcess
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import relay_env, write_events

pytestmark = pytest.mark.slow


def outbox_relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=relay_env(env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    """A port free right now; another process may take it before the relay binds it, so
    `start_relay_with_metrics` retries on that."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_relay_with_metrics(
    *, tries: int = 5, extra: list[str], **options: str
) -> tuple[RelayProcess, int]:
    """A relay process serving metrics on a free port, and the port. The relay's own log line
    says it listens (so the endpoint scraped is this relay's, not a process that took the
    port in between); a relay that lost the race for its port is started on another one."""
    for _ in range(tries):
        port = free_port()
        relay = RelayProcess(
            **options,
            extra=[*extra, "--metrics-port", str(port), "--metrics-address", "127.0.0.1"],
        )
        listening = f"metrics on http://127.0.0.1:{port}/metrics"
        wait_for(
            lambda: listening in relay.output or relay.process.poll() is not None,  # noqa: B023
            30,
            "the relay's metrics endpoint",
        )
        if relay.process.poll() is None:
            return relay, port
        code = relay.stop()
        assert code == 2 and "cannot listen" in relay.output, relay.output
    raise AssertionError(f"no free metrics port in {tries} tries")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def dead_count(engine: sa.Engine, box: Outbox) -> int:
    t = box.events
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(t.c.status == "dead")
        return int(conn.execute(query).scalar_one())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_unroutable_event_dies_is_requeued_after_binding_and_arrives_with_its_id(
    pg_engine: sa.Engine, pg_url: str, amqp_url: str, outbox_schema: Outbox
) -> None:
    assert outbox_schema.schema is not None
    env = {"OUTBOX_DATABASE_URL": pg_url, "OUTBOX_SCHEMA": outbox_schema.schema}
    order = Event(type="order.placed", key="order:1", payload={"total": "9.99"})
    invoice = Event(type="invoice.created", key="invoice:1", payload={"order": 1})
    with QueueTap(amqp_url) as tap:
        # Given: a relay process, and a queue bound to order events only.
        exchange = tap.declare_exchange(unique_name("ex"))
        tap.bind(exchange, "order.#")
        relay, port = start_relay_with_metrics(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=outbox_schema.schema,
            exchange=exchange,
            name=unique_name("relay"),
            extra=[
                *("--max-attempts", "2", "--retry-min", "0.05s", "--retry-max", "0.1s"),
                *("--lease", "5s", "--poll-interval", "0.2s"),
            ],
        )
        try:
            # When: an order event and an unroutable invoice event are committed.
            write_events(pg_engine, outbox_schema, [order, invoice])
            first = tap.drain(expected=1, timeout=15)
            assert [d.message_id for d in first] == [str(order.id)]
            wait_for(lambda: dead_count(pg_engine, outbox_schema) == 1, 15, "the dead letter")

            # Then: it is listed, and shown with its error history.
            listed = outbox_relay("dead", "list", "--json", env=env)
            assert listed.returncode == 0, listed.stderr
            (letter,) = json.loads(listed.stdout)
            assert letter["id"] == str(invoice.id) and letter["attempts"] == 2
            assert "unroutable" in letter["last_error"]
            shown = outbox_relay("dead", "show", str(invoice.id), "--json", env=env)
            assert shown.returncode == 0, shown.stderr
            detail = json.loads(shown.stdout)
            assert detail["payload"] == {"order": 1}
            assert [f["attempt"] for f in detail["failures"]] == [1, 2]
            status = json.loads(outbox_relay("status", "--json", env=env).stdout)
            assert status["dead"] == 1 and len(status["active_relays"]) == 1

            metrics = scrape(port)
            assert (
                'outbox_relay_events_dead_lettered_total{event_type="invoice.created"} 1.0'
                in metrics
            )
            assert 'outbox_relay_events_published_total{event_type="order.placed"} 1.0' in metrics
            assert "outbox_relay_dead_events 1.0" in metrics

            # When: the queue is bound for invoices and the dead letter is requeued.
            tap.bind(exchange, "invoice.#")
            requeued = outbox_relay("dead", "requeue", str(invoice.id), "--yes", env=env)
            assert requeued.returncode == 0, requeued.stderr
            assert "requeued 1 dead letter" in requeued.stdout

            # Then: it arrives, with its original message_id.
            deliveries = tap.drain(expected=2, timeout=15)
        finally:
            code = relay.stop()
            output = relay.output
    assert [d.message_id for d in deliveries] == [str(order.id), str(invoice.id)]
    _, properties, body = tap.raw[1]
    assert properties.message_id == str(invoice.id)
    assert properties.headers["ordering-key"] == "invoice:1"
    assert json.loads(body) == {"order": 1}
    assert dead_count(pg_engine, outbox_schema) == 0
    assert code == 0, output


def test_requeue_of_an_unknown_id_exits_1_and_changes_nothing(
    pg_url: str, outbox_schema: Outbox
) -> None:
    assert outbox_schema.schema is not None
    env = {"OUTBOX_DATABASE_URL": pg_url, "OUTBOX_SCHEMA": outbox_schema.schema}
    result = outbox_relay("dead", "requeue", "0190a6c2-0000-7000-8000-000000000000", env=env)
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "nothing was changed" in result.stderr


def test_demo_delivers_and_applies_every_committed_event_once_in_order_and_cleans_up(
    pg_engine: sa.Engine, pg_url: str, amqp_url: str, schema_name: str
) -> None:
    result = outbox_relay(
        "demo", "--database-url", pg_url, "--amqp-url", amqp_url, "--schema", schema_name
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "result       OK" in out
    assert "rolled back  1 event (not delivered, as it must be)" in out
    assert "written      15 events committed" in out
    assert "duplicates   0" in out
    # The consumer side: applied once, in order, the injected duplicate skipped.
    assert (
        "applied      15 of 15 committed events, each once; none from the rolled-back "
        "transaction" in out
    )
    assert "apply order  OK: in write order per key" in out
    assert "stock        demo-widget 100 -> 95 after 5 orders placed; 10 emails sent" in out
    assert "15 handled, 1 duplicate" in out
    duplicate = out.split("duplicate published again: message ", 1)[1].split()[0]
    assert f"duplicate    message {duplicate} published again: skipped, applied once" in out
    assert "order:1  order.placed (stock) -> order.paid (email) -> order.shipped (email)" in out
    # What the report says is what the handlers' tables and the inbox hold.
    with pg_engine.connect() as conn:
        moves = conn.execute(
            sa.text(f'SELECT message_id, order_key FROM "{schema_name}".demo_stock_move')
        ).all()
        emails = conn.execute(
            sa.text(f'SELECT order_key, seq FROM "{schema_name}".demo_email ORDER BY id')
        ).all()
        inbox = conn.execute(sa.text(f'SELECT count(*) FROM "{schema_name}".inbox')).scalar()
        stock = conn.execute(sa.text(f'SELECT quantity FROM "{schema_name}".demo_stock')).scalar()
    assert sorted(key for _, key in moves) == [f"order:{n}" for n in range(1, 6)]
    assert [m for m, _ in moves].count(duplicate) == 1
    assert len(emails) == 10 and inbox == 15 and stock == 95
    for key in {k for k, _ in emails}:
        seqs = [seq for k, seq in emails if k == key]
        assert seqs == sorted(seqs), key  # paid before shipped
    # The demo's exchanges and queues are gone (it deleted what it created, nothing else).
    exchange = out.split("exchange ", 1)[1].split()[0]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for name in (exchange, f"{exchange}.hash"):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as error:
                connection.channel().exchange_declare(name, passive=True)
            assert error.value.reply_code == 404
        for queue in [exchange, *(f"{exchange}.{i}" for i in range(4))]:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as error:
                connection.channel().queue_declare(queue, passive=True)
            assert error.value.reply_code == 404, queue
    finally:
        connection.close()


def test_run_exits_with_documented_codes_on_startup_errors(amqp_url: str) -> None:
    env = {
        "OUTBOX_AMQP_URL": amqp_url,
        "OUTBOX_DATABASE_URL": "postgresql://u:s3cret@127.0.0.1:1/x",
    }
    unreachable = outbox_relay("run", env=env)
    assert unreachable.returncode == 3
    assert "postgresql://u:***@127.0.0.1:1/x" in unreachable.stderr
    assert "OUTBOX_DATABASE_URL" in unreachable.stderr and "s3cret" not in unreachable.stderr
    bad = outbox_relay("run", "--lease", "1s", env=env)
    assert bad.returncode == 2 and "--lease must be at least 2 seconds" in bad.stderr


def test_a_relay_that_loses_its_metrics_port_is_started_on_another(
    monkeypatch: pytest.MonkeyPatch, pg_url: str, amqp_url: str, outbox_schema: Outbox
) -> None:
    """The race `free_port` can lose, forced: the first port offered is taken by the time
    the relay binds it. The relay exits 2 saying so, and the helper retries elsewhere."""
    assert outbox_schema.schema is not None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        offered = iter([int(taken.getsockname()[1])])
        real_free_port = free_port
        monkeypatch.setattr(
            sys.modules[__name__], "free_port", lambda: next(offered, None) or real_free_port()
        )
        relay, port = start_relay_with_metrics(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=outbox_schema.schema,
            exchange=unique_name("ex"),
            name=unique_name("relay"),
            extra=[],
        )
        try:
            assert port != taken.getsockname()[1]
            assert "outbox_relay_events_published_total" in scrape(port)
        finally:
            assert relay.stop() == 0, relay.output
