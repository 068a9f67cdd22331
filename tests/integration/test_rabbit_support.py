"""The broker-side test helpers, checked against the real broker before fault tests trust them.

A tap that silently dropped or duplicated messages, or a connection killer that hit the
wrong connection, would make every fault test meaningless, so each helper is verified here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from tests.support.history import Delivery, Written, check_history
from tests.support.rabbit import (
    DEFAULT_AMQP_URL,
    QueueTap,
    RabbitmqctlError,
    _pump,
    broker_memory_alarm,
    close_connection_named,
    list_connections,
    memory_alarm_active,
    memory_watermark,
    rabbitmqctl,
    unique_name,
)


def _connect(name: str | None = None, **options: object) -> pika.BlockingConnection:
    params = pika.URLParameters(DEFAULT_AMQP_URL)
    if name is not None:
        params.client_properties = {"connection_name": name}
    for option, value in options.items():
        setattr(params, option, value)
    return pika.BlockingConnection(params)


@pytest.fixture
def publisher() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A confirming channel, so a returned publish is known to be in the tap's queue."""
    connection = _connect(unique_name("test-publisher"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        if connection.is_open:
            connection.close()


def _event_properties(event: Written) -> pika.BasicProperties:
    """Properties shaped like the relay's: identity in message_id and headers."""
    return pika.BasicProperties(
        message_id=event.id,
        type="test.happened",
        content_type="application/json",
        delivery_mode=2,  # persistent
        headers={"ordering-key": event.key, "outbox-seq": event.seq},
    )


def _events(n: int) -> list[Written]:
    return [Written(str(uuid.uuid4()), None if i % 3 == 0 else f"k{i % 2}", i) for i in range(n)]


def _assert_all_acked(tap: QueueTap) -> None:
    """Nothing is left unacknowledged: after a disconnect, unacked messages would be ready."""
    tap._drop_connection()
    assert tap.message_count() == 0


def test_unique_name() -> None:
    name = unique_name("orders")

    assert name.startswith("orders-")
    assert len(name) == len("orders-") + 8
    int(name[-8:], 16)
    assert unique_name("orders") != name


def test_tap_records_published_events_and_cleans_up(
    publisher: pika.adapters.blocking_connection.BlockingChannel,
) -> None:
    events = _events(5)
    with QueueTap() as tap:
        exchange = tap.declare_exchange(unique_name("test-events"))
        tap.bind(exchange, "orders.#")
        for event in events:
            body = json.dumps({"id": event.id}).encode()
            publisher.basic_publish(exchange, "orders.created", body, _event_properties(event))
        publisher.basic_publish(exchange, "invoices.created", b"{}", _event_properties(events[0]))
        publisher.basic_publish(exchange, "orders.raw", b"not from the relay")

        assert tap.message_count() == 6
        started = time.monotonic()
        deliveries = tap.drain(expected=6, timeout=60)
        # Not a speed limit: a drain that waited out its 60 s idle timeout would take that long.
        assert time.monotonic() - started < 30, "drain must return as soon as all arrived"

        assert deliveries[:5] == [Delivery(e.id, e.key, e.seq) for e in events]
        # A message without the relay's headers is kept, marked so the checker flags it.
        assert deliveries[5] == Delivery("", None, -1)
        check_history(events, deliveries[:5]).assert_ok()
        method, properties, body = tap.raw[0]
        assert method.routing_key == "orders.created"
        assert properties.type == "test.happened"
        assert properties.content_type == "application/json"
        assert properties.delivery_mode == 2
        assert json.loads(body) == {"id": events[0].id}

        # Idle timeout: nothing more arrives, so drain gives up and returns what it has.
        started = time.monotonic()
        assert len(tap.drain(expected=7, timeout=0.5)) == 6
        assert time.monotonic() - started >= 0.5, "drain gave up before its idle timeout"
        assert tap.message_count() == 0
        queue = tap.queue

    check = _connect()
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as gone:
            check.channel().queue_declare(queue, passive=True)
        assert gone.value.reply_code == 404
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as gone:
            check.channel().exchange_declare(exchange, passive=True)
        assert gone.value.reply_code == 404
    finally:
        check.close()


@pytest.mark.parametrize("noticed_while", ["receiving", "acknowledging"])
def test_tap_reconnects_without_recording_its_own_redeliveries(
    publisher: pika.adapters.blocking_connection.BlockingChannel,
    noticed_while: str,
) -> None:
    events = _events(3)
    with QueueTap() as tap:
        for event in events:
            publisher.basic_publish("", tap.queue, b"{}", _event_properties(event))
        # Receive without acknowledging (white-box: drain would ack before returning) ...
        connection = tap._ensure_consuming()
        deadline = time.monotonic() + 5
        while len(tap.deliveries) < 3 and time.monotonic() < deadline:
            _pump(connection, 0.1)
        assert len(tap.deliveries) == 3
        # ... then lose the connection: the broker redelivers all three.
        assert close_connection_named(tap.connection_name, "test: kill the tap") == 1

        if noticed_while == "receiving":
            # Expecting more makes drain read first and find the connection gone: the three
            # unacknowledged deliveries are forgotten and recorded again as redeliveries.
            deliveries = tap.drain(expected=4, timeout=1)
            assert all(d.redelivered for d in deliveries)
        else:
            # All expected messages are in: drain only acknowledges, and that ack fails. The
            # tap cannot know whether the broker got it, so it keeps the deliveries ...
            deliveries = tap.drain(expected=3, timeout=5)
            assert not any(d.redelivered for d in deliveries)
            # ... and does not record the broker's redeliveries a second time.
            deliveries = tap.drain(expected=4, timeout=1)

        assert [d.message_id for d in deliveries] == [e.id for e in events]
        check_history(events, deliveries).assert_ok()
        assert len(tap.raw) == 3
        _assert_all_acked(tap)


@pytest.mark.parametrize("ack_reached_broker", [True, False])
def test_tap_records_once_when_an_ack_fails_in_flight(
    publisher: pika.adapters.blocking_connection.BlockingChannel,
    monkeypatch: pytest.MonkeyPatch,
    ack_reached_broker: bool,
) -> None:
    """Whether or not a failed ack was processed, each message is recorded exactly once."""
    events = _events(3)
    with QueueTap() as tap:
        for event in events:
            publisher.basic_publish("", tap.queue, b"{}", _event_properties(event))
        connection = tap._ensure_consuming()
        deadline = time.monotonic() + 5
        while len(tap.deliveries) < 3 and time.monotonic() < deadline:
            _pump(connection, 0.1)
        channel = tap._channel
        assert channel is not None
        real_ack = channel.basic_ack

        def failing_ack(delivery_tag: int = 0, multiple: bool = False) -> None:
            if ack_reached_broker:
                real_ack(delivery_tag, multiple)
                channel.basic_qos(prefetch_count=1000)  # round trip: the broker has the ack
            raise pika.exceptions.StreamLostError("injected: connection died during ack")

        monkeypatch.setattr(channel, "basic_ack", failing_ack)

        # Expect one more than was published so drain keeps going after the reconnect.
        deliveries = tap.drain(expected=4, timeout=1)

        assert [d.message_id for d in deliveries] == [e.id for e in events]
        assert not any(d.redelivered for d in deliveries)
        check_history(events, deliveries).assert_ok()
        _assert_all_acked(tap)


def test_close_connection_named_closes_only_that_connection() -> None:
    victim_name, bystander_name = unique_name("test-victim"), unique_name("test-bystander")
    victim, bystander = _connect(victim_name), _connect(bystander_name)
    try:
        listed = {c["connection_name"]: c for c in list_connections()}
        assert listed[victim_name]["pid"].startswith("<")
        assert " -> " in listed[bystander_name]["name"]

        assert close_connection_named(victim_name, "test: partition") == 1

        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                _pump(victim, 0.1)
        assert closed.value.reply_code == 320
        assert "test: partition" in closed.value.reply_text
        channel = bystander.channel()
        channel.confirm_delivery()
        channel.basic_publish("", unique_name("test-nowhere"), b"still works")
        assert bystander.is_open
        assert close_connection_named(victim_name) == 0
    finally:
        for connection in (victim, bystander):
            if connection.is_open:
                connection.close()


def test_rabbitmqctl_failure_is_reported_clearly() -> None:
    with pytest.raises(RabbitmqctlError, match="exited with"):
        rabbitmqctl("close_connection", "#PID<0.0.0>", "not a usable pid")


@pytest.mark.broker_wide
def test_memory_alarm_blocks_publishers_and_is_lifted() -> None:
    """... and afterwards the node has the watermark it had before, not RabbitMQ's default:
    here one set just before (0.41); the node's original one is set back at the end."""
    original = memory_watermark()
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0.41")
        _memory_alarm_blocks_publishers_and_is_lifted()
        assert memory_watermark() == ("0.41",)
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *original)
    assert memory_watermark() == original


def _memory_alarm_blocks_publishers_and_is_lifted() -> None:
    with QueueTap() as tap:
        with broker_memory_alarm():
            assert memory_alarm_active()
            blocked = _connect(unique_name("test-blocked"), blocked_connection_timeout=1)
            try:
                channel = blocked.channel()
                channel.confirm_delivery()
                with pytest.raises(pika.exceptions.ConnectionBlockedTimeout):
                    channel.basic_publish("", tap.queue, b"blocked")
            finally:
                if blocked.is_open:
                    blocked.close()

        assert not memory_alarm_active()
        after = _connect(unique_name("test-after-alarm"), blocked_connection_timeout=5)
        try:
            channel = after.channel()
            channel.confirm_delivery()
            channel.basic_publish("", tap.queue, b"flows again")
        finally:
            after.close()
        # The blocked publish timed out on the client, yet the broker may still enqueue it
        # once the alarm clears: a publish that timed out must be treated as "maybe sent".
        tap.drain(expected=2, timeout=1)
        bodies = [body for _, _, body in tap.raw]
        assert b"flows again" in bodies
        assert set(bodies) <= {b"blocked", b"flows again"}


def test_tap_cleanup_never_raises_when_the_broker_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tap = QueueTap(amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        tap.__enter__()  # a failed enter has already cleaned up (and logged) ...

    tap.close()  # ... and cleaning up again is harmless

    assert "cannot reach the broker" in caplog.text
