"""AmqpPublisher against the real broker: confirms, returns, nacks, channel and connection loss.

The publisher's promise is exactly one outcome per message handed to publish(), whatever the
broker does, so every test counts outcomes by tag, not only their kinds. Each test declares
its own uniquely named exchange and queue on a side connection and deletes them afterwards:
the broker is shared.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType
from pika.spec import BasicProperties

from outbox import Outbox
from relay import publisher as publisher_module
from relay.amqp_frames import PublishEncoder
from relay.messages import (
    BrokerStatus,
    Outcome,
    OutgoingMessage,
    PublisherEvent,
    PublishOutcome,
)
from relay.publisher import NACKED, NOT_CONNECTED, AmqpPublisher
from tests.support.rabbit import close_connection_named, unique_name
from tests.support.relays import relay_env

# Generous: the broker is shared with other test runs and confirms can take hundreds of ms.
WAIT = 10.0


class Recorder:
    """A thread-safe sink that lets the test wait for what the publisher reported."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.events: list[PublisherEvent] = []
        self.calls = 0
        # Counters, so that predicates waited on under load do not rescan every event.
        self.outcome_count = 0
        self.confirmed_count = 0

    def __call__(self, events: Sequence[PublisherEvent]) -> None:
        with self.condition:
            self.events.extend(events)
            self.calls += 1
            for event in events:
                if isinstance(event, PublishOutcome):
                    self.outcome_count += 1
                    self.confirmed_count += event.outcome is Outcome.CONFIRMED
            self.condition.notify_all()

    def outcomes(self) -> list[PublishOutcome]:
        with self.condition:
            return [e for e in self.events if isinstance(e, PublishOutcome)]

    def statuses(self) -> list[BrokerStatus]:
        with self.condition:
            return [e for e in self.events if isinstance(e, BrokerStatus)]

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.condition:
            if not self.condition.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_outcomes(self, count: int, timeout: float = WAIT) -> list[PublishOutcome]:
        self.wait_until(lambda: self.outcome_count >= count, f"{count} outcomes", timeout)
        return self.outcomes()

    def wait_up(self, times: int = 1, timeout: float = WAIT) -> None:
        self.wait_until(
            lambda: sum(s.up for s in self.statuses()) >= times, f"BrokerStatus(up=True) x{times}"
        )


class SideBroker:
    """A separate BlockingConnection that sets up and tears down this test's topology."""

    def __init__(self, amqp_url: str) -> None:
        params = pika.URLParameters(amqp_url)
        params.client_properties = {"connection_name": unique_name("test-publisher-side")}
        self.connection = pika.BlockingConnection(params)
        self.channel: BlockingChannel = self.connection.channel()
        self._exchanges: list[str] = []
        self._queues: list[str] = []

    def exchange(self, name: str | None = None, type: str = "topic") -> str:
        name = name or unique_name("test-publisher-ex")
        # Durable, as the publisher declares it: an equivalent declare must not fail with 406.
        self.channel.exchange_declare(
            name, exchange_type=ExchangeType(type), durable=True, auto_delete=False
        )
        self._exchanges.append(name)
        return name

    def queue(
        self, exchange: str, binding: str = "#", arguments: dict[str, Any] | None = None
    ) -> str:
        name = unique_name("test-publisher-q")
        self.channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
        self._queues.append(name)
        self.channel.queue_bind(name, exchange, routing_key=binding)
        return name

    def get(self, queue: str, count: int) -> list[tuple[BasicProperties, bytes]]:
        """Consume `count` messages (or fewer, if the queue stays idle for WAIT seconds)."""
        received: list[tuple[BasicProperties, bytes]] = []
        for method, properties, body in self.channel.consume(
            queue, auto_ack=True, inactivity_timeout=WAIT
        ):
            if method is None:
                break
            assert properties is not None and body is not None
            received.append((properties, body))
            if len(received) >= count:
                break
        self.channel.cancel()
        return received

    def message_count(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count or 0)

    def close(self) -> None:
        try:
            for queue in self._queues:
                self.channel.queue_delete(queue)
            for exchange in self._exchanges:
                self.channel.exchange_delete(exchange)
        finally:
            if self.connection.is_open:
                self.connection.close()


@pytest.fixture
def side(amqp_url: str) -> Iterator[SideBroker]:
    broker = SideBroker(amqp_url)
    yield broker
    broker.close()


PublisherFactory = Callable[..., tuple[AmqpPublisher, Recorder]]


@pytest.fixture
def make_publisher(amqp_url: str) -> Iterator[PublisherFactory]:
    created: list[AmqpPublisher] = []

    def make(
        exchange: str, *, start: bool = True, url: str | None = None, **options: Any
    ) -> tuple[AmqpPublisher, Recorder]:
        recorder = Recorder()
        publisher = AmqpPublisher(
            url or amqp_url,
            recorder,
            connection_name=unique_name("test-publisher"),
            exchange=exchange,
            **options,
        )
        created.append(publisher)
        if start:
            publisher.start()
        return publisher, recorder

    yield make
    for publisher in created:
        publisher.stop(5.0)


def message(
    tag: int, exchange: str, routing_key: str = "orders.created", **overrides: Any
) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "tag": tag,
        "exchange": exchange,
        "routing_key": routing_key,
        "body": f'{{"n": {tag}}}'.encode(),
        "message_id": str(uuid.uuid4()),
        "type": "order.created",
        "timestamp": 1_700_000_000 + tag,
        "headers": {"ordering-key": f"k{tag % 7}", "outbox-seq": tag},
        "correlation_id": f"corr-{tag}",
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def by_tag(outcomes: Sequence[PublishOutcome]) -> dict[int, PublishOutcome]:
    counts = Counter(o.tag for o in outcomes)
    duplicated = {tag: n for tag, n in counts.items() if n > 1}
    assert not duplicated, f"tags with more than one outcome: {duplicated}"
    return {o.tag: o for o in outcomes}


def publisher_thread(publisher: AmqpPublisher) -> threading.Thread | None:
    name = f"amqp-publisher-{publisher.connection_name}"
    return next((t for t in threading.enumerate() if t.name == name), None)


def publisher_thread_alive(publisher: AmqpPublisher) -> bool:
    thread = publisher_thread(publisher)
    return thread is not None and thread.is_alive()


def close_our_connection(connection_name: str, timeout: float = 15.0) -> None:
    """Close exactly this publisher's connection from the broker side (320 CONNECTION_FORCED).

    rabbitmqctl lists a new connection only once it is registered, so retry until it shows
    up; tests.support.rabbit does the parsing (its pid column is the form close_connection
    accepts) and never touches a connection with another name.
    """
    deadline = time.monotonic() + timeout
    while close_connection_named(connection_name, "test") == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"connection {connection_name!r} never showed up in rabbitmqctl")
        time.sleep(0.2)


def test_confirms_every_message_once_in_order_with_properties(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange()
    queue = side.queue(exchange)
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()
    messages = [message(tag, exchange) for tag in range(2000)]

    for start in range(0, len(messages), 100):
        publisher.publish(messages[start : start + 100])

    outcomes = recorder.wait_outcomes(2000, timeout=30.0)
    publisher.stop(5.0)
    final = recorder.outcomes()
    assert len(final) == 2000  # nothing more arrived, not even at stop
    settled = by_tag(final)
    assert set(settled) == set(range(2000))
    assert all(o.outcome is Outcome.CONFIRMED and o.error is None for o in outcomes)
    assert publisher.published_total == 2000
    # One sink call per ack frame, not per message (acks use multiple=True under load).
    assert recorder.calls < 2000

    received = side.get(queue, 2000)
    assert [p.message_id for p, _ in received] == [m.message_id for m in messages]
    for (properties, body), sent in zip(received, messages, strict=True):
        assert body == sent.body
        assert properties.delivery_mode == 2
        assert properties.type == sent.type
        assert properties.headers == dict(sent.headers)
        assert properties.content_type == "application/json"
        assert properties.correlation_id == sent.correlation_id
        assert properties.app_id == "outbox-relay"
        assert properties.timestamp == sent.timestamp


def test_unroutable_message_is_rejected_and_routable_ones_confirmed(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange()
    queue = side.queue(exchange, binding="routed.#")
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()
    routing_keys = {tag: "routed.x" if tag % 2 == 0 else "nowhere.x" for tag in range(10)}

    publisher.publish([message(tag, exchange, key) for tag, key in routing_keys.items()])

    settled = by_tag(recorder.wait_outcomes(10))
    assert set(settled) == set(routing_keys)
    for tag, key in routing_keys.items():
        if key.startswith("routed"):
            assert settled[tag].outcome is Outcome.CONFIRMED
        else:
            assert settled[tag].outcome is Outcome.REJECTED
            assert settled[tag].error == (
                f"unroutable: 312 NO_ROUTE (exchange={exchange}, routing_key={key})"
            )
    assert len(side.get(queue, 5)) == 5


def test_full_queue_with_reject_publish_nacks(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange()
    side.queue(exchange, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()

    publisher.publish([message(tag, exchange) for tag in range(5)])

    settled = by_tag(recorder.wait_outcomes(5))
    assert set(settled) == set(range(5))
    kinds = Counter(o.outcome for o in settled.values())
    assert kinds[Outcome.CONFIRMED] >= 1
    assert kinds[Outcome.CONFIRMED] + kinds[Outcome.REJECTED] == 5
    assert all(o.error == NACKED for o in settled.values() if o.outcome is Outcome.REJECTED)
    # The error says where to look.
    assert "queue length limit" in NACKED and "reject-publish" in NACKED
    assert "disk or memory alarm" in NACKED and "internal error" in NACKED


def test_missing_exchange_rejects_batch_and_channel_recovers(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = unique_name("test-publisher-missing")  # not declared yet
    publisher, recorder = make_publisher(exchange, declare_exchange=False)
    recorder.wait_up()

    publisher.publish([message(tag, exchange) for tag in range(5)])

    settled = by_tag(recorder.wait_outcomes(5))
    assert all(o.outcome is Outcome.REJECTED for o in settled.values())
    assert all(o.error is not None and "404 NOT_FOUND" in o.error for o in settled.values())
    recorder.wait_up(times=2)  # a new channel on the same connection
    statuses = recorder.statuses()
    assert [s.up for s in statuses] == [True, False, True]
    assert statuses[1].error is not None and "404" in statuses[1].error
    assert not statuses[1].fatal
    assert publisher.ready

    side.exchange(exchange)
    side.queue(exchange)
    publisher.publish([message(tag, exchange) for tag in range(5, 10)])

    settled = by_tag(recorder.wait_outcomes(10))
    assert all(settled[tag].outcome is Outcome.CONFIRMED for tag in range(5, 10))


def test_message_over_the_size_limit_is_refused_for_good_and_spares_the_window(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    """Given a broker limit of 1000 bytes, when a batch holds one 2000-byte body between small
    ones, then that one alone is REJECTED (not retryable, saying why) without being sent, the
    others are confirmed, and the channel never closes."""
    exchange = side.exchange()
    queue = side.queue(exchange)
    publisher, recorder = make_publisher(exchange, max_message_size=1000)
    recorder.wait_up()

    batch = [message(0, exchange), message(1, exchange, body=b"x" * 2000), message(2, exchange)]
    publisher.publish(batch)

    settled = by_tag(recorder.wait_outcomes(3))
    assert settled[1].outcome is Outcome.REJECTED and not settled[1].retryable
    assert settled[1].error is not None and "2000 bytes" in settled[1].error
    assert "max_message_size of 1000 bytes" in settled[1].error
    assert settled[0].outcome is settled[2].outcome is Outcome.CONFIRMED
    assert settled[0].retryable and settled[2].retryable
    assert [s.up for s in recorder.statuses()] == [True]  # the channel stayed open
    received = [properties.message_id for properties, _ in side.get(queue, 2)]
    assert received == [batch[0].message_id, batch[2].message_id]
    assert side.message_count(queue) == 0


def test_bodies_over_a_frame_and_every_header_type_arrive_intact_in_order(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    """The publisher encodes frames itself (relay.amqp_frames): a body larger than the
    broker's frame_max (131072) goes in several body frames, an empty body in none, and
    header values of every type the broker decodes come back as they were sent."""
    exchange = side.exchange()
    queue = side.queue(exchange)
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()
    big = bytes(random.Random(3).randrange(256) for _ in range(400_000))
    headers = {
        "ordering-key": "k-ü✓",
        "list": [1, "a", None, True, [2, b"raw"]],
        "table": {"nested": {"deeper": -5}, "s": ""},
        "big": 2**40,
        "small": -(2**31),
        "bytes": b"\x00\xff",
        "flag": False,
        "none": None,
        "long text": "t" * 70_000,
    }
    batch = [
        message(0, exchange),
        message(1, exchange, body=big),
        message(2, exchange, headers=headers),
        message(3, exchange, body=b""),
        message(4, exchange, body=big[:131_064]),  # exactly one full body frame
        message(5, exchange),
    ]
    publisher.publish(batch)

    settled = by_tag(recorder.wait_outcomes(len(batch)))
    assert all(o.outcome is Outcome.CONFIRMED for o in settled.values()), settled
    received = side.get(queue, len(batch))
    assert [p.message_id for p, _ in received] == [m.message_id for m in batch]
    assert [body for _, body in received] == [m.body for m in batch]
    assert received[2][0].headers == headers
    assert [s.up for s in recorder.statuses()] == [True]


def test_a_message_that_cannot_be_encoded_is_refused_for_good_and_spares_its_batch(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    """Given a batch with a float header (AMQP tables as pika writes them have no float), a
    routing key of 256 bytes (a short string holds 255) and headers larger than a frame
    (the broker would close the connection), those three are REJECTED, not retryable,
    saying why; the rest of the batch is confirmed and the connection stays open."""
    exchange = side.exchange()
    queue = side.queue(exchange)
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()
    batch = [
        message(0, exchange),
        message(1, exchange, headers={"price": 1.5}),
        message(2, exchange, routing_key="r" * 256),
        message(3, exchange, routing_key="r" * 255),
        message(4, exchange, headers={"note": "n" * 200_000}),
    ]
    publisher.publish(batch)

    settled = by_tag(recorder.wait_outcomes(len(batch)))
    assert settled[4].error is not None and "make its headers smaller" in settled[4].error
    for tag in (1, 2, 4):
        assert settled[tag].outcome is Outcome.REJECTED and not settled[tag].retryable
        assert settled[tag].error is not None and "cannot encode" in settled[tag].error
    assert settled[0].outcome is settled[3].outcome is Outcome.CONFIRMED
    received = [properties.message_id for properties, _ in side.get(queue, 2)]
    assert received == [batch[0].message_id, batch[3].message_id]
    assert [s.up for s in recorder.statuses()] == [True]


def ready_publisher(
    side: SideBroker, make_publisher: PublisherFactory, **options: Any
) -> tuple[str, AmqpPublisher, Recorder]:
    """An exchange with a queue bound, and a publisher on it that is up."""
    exchange = side.exchange()
    side.queue(exchange)
    publisher, recorder = make_publisher(exchange, **options)
    recorder.wait_up()
    return exchange, publisher, recorder


@pytest.mark.parametrize(
    ("error", "retryable"), [(MemoryError, True), (RuntimeError, False)], ids=["memory", "bug"]
)
def test_an_error_while_encoding_refuses_the_message_for_good_unless_memory_ran_out(
    side: SideBroker,
    make_publisher: PublisherFactory,
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
    retryable: bool,
) -> None:
    """Encoding is deterministic: a message that failed to encode would fail on every
    attempt, and is refused for good (as one AMQP cannot carry). Out of memory, it is
    refused but retryable (it may pass; attempts bound the retries). Either way the rest of
    its batch is confirmed."""
    real_encode = PublishEncoder.encode

    def failing(self: PublishEncoder, m: OutgoingMessage) -> list[bytes]:
        if m.tag == 1:
            raise error
        return real_encode(self, m)

    monkeypatch.setattr(PublishEncoder, "encode", failing)
    exchange, publisher, recorder = ready_publisher(side, make_publisher)
    publisher.publish([message(tag, exchange) for tag in range(3)])

    settled = by_tag(recorder.wait_outcomes(3))
    assert settled[1].outcome is Outcome.REJECTED and settled[1].retryable is retryable
    assert settled[1].error is not None and error.__name__ in settled[1].error
    assert settled[0].outcome is settled[2].outcome is Outcome.CONFIRMED


def test_a_failed_write_still_settles_every_message_of_its_batch_once(
    side: SideBroker, make_publisher: PublisherFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a write to the connection that raises, the messages refused before it (too
    large) keep their outcome, and those counted as sent come back UNKNOWN when the
    connection closes: each message of the batch gets exactly one outcome."""
    failures = [RuntimeError("write failed")]
    real_write = publisher_module.write_frames

    def failing_write(connection: Any, pieces: Sequence[bytes]) -> None:
        if failures:
            raise failures.pop()
        real_write(connection, pieces)

    monkeypatch.setattr(publisher_module, "write_frames", failing_write)
    exchange, publisher, recorder = ready_publisher(side, make_publisher, max_message_size=1000)
    batch = [message(0, exchange), message(1, exchange, body=b"x" * 2000), message(2, exchange)]
    publisher.publish(batch)

    settled = by_tag(recorder.wait_outcomes(3))
    assert settled[1].outcome is Outcome.REJECTED and not settled[1].retryable
    assert settled[0].outcome is settled[2].outcome is Outcome.UNKNOWN
    recorder.wait_up(times=2)  # the publisher reconnected
    publisher.publish([message(3, exchange)])
    assert by_tag(recorder.wait_outcomes(4))[3].outcome is Outcome.CONFIRMED
    assert len(recorder.outcomes()) == 4


def test_a_batch_is_written_to_the_connection_at_once(
    side: SideBroker, make_publisher: PublisherFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write of a few pieces per batch (one send() each on an idle socket), not three
    sends per message: that was a third of the relay's CPU per event."""
    writes: list[int] = []
    real_write = publisher_module.write_frames

    def counting_write(connection: Any, pieces: Sequence[bytes]) -> None:
        writes.append(len(pieces))
        real_write(connection, pieces)

    monkeypatch.setattr(publisher_module, "write_frames", counting_write)
    exchange, publisher, recorder = ready_publisher(side, make_publisher)
    publisher.publish([message(tag, exchange) for tag in range(300)])

    settled = by_tag(recorder.wait_outcomes(300))
    assert all(o.outcome is Outcome.CONFIRMED for o in settled.values())
    assert len(writes) == 1
    assert writes[0] < 10  # 300 messages of about 300 bytes: pieces of 128 KiB


def test_channel_closed_by_one_bad_publish_spends_no_attempt_of_the_others(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    """Given a window of messages to a good exchange, when one message in the middle goes to
    an exchange that does not exist (the broker closes the channel: 404), then only that one
    is REJECTED; every other message is CONFIRMED or comes back UNKNOWN (republished with the
    same message_id, no attempt spent), and a new channel opens."""
    exchange = side.exchange()
    side.queue(exchange)
    missing = unique_name("test-publisher-missing")
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()

    batch = [message(tag, exchange) for tag in range(40)]
    batch[20] = message(20, missing)
    publisher.publish(batch)

    settled = by_tag(recorder.wait_outcomes(40))
    rejected = {tag for tag, o in settled.items() if o.outcome is Outcome.REJECTED}
    assert rejected == {20}
    assert settled[20].error is not None and "404" in settled[20].error
    assert settled[20].retryable  # the exchange may yet be declared
    # Confirms of the messages before it may or may not have arrived before the close; the
    # broker discarded those after it.
    assert all(settled[tag].outcome is Outcome.UNKNOWN for tag in range(21, 40))
    recorder.wait_up(times=2)


def test_connection_closed_by_broker_reports_unknown_and_reconnects(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange()
    side.queue(exchange)
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()
    handed: list[int] = []
    done = threading.Event()
    failures: list[BaseException] = []

    def in_flight() -> int:
        return len(handed) - recorder.outcome_count

    def load() -> None:
        try:
            while not done.is_set():
                recorder.wait_until(
                    lambda: in_flight() < 500 or done.is_set(), "room in the window"
                )
                batch = [message(len(handed) + i, exchange) for i in range(50)]
                handed.extend(m.tag for m in batch)
                publisher.publish(batch)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    loader = threading.Thread(target=load, name="test-publisher-loader", daemon=True)
    loader.start()
    try:

        def confirmed() -> int:
            return recorder.confirmed_count

        recorder.wait_until(lambda: confirmed() >= 1000, "1000 confirms before the kill")
        close_our_connection(publisher.connection_name)

        def reconnected() -> bool:
            ups = [s.up for s in recorder.statuses()]
            return ups[:2] == [True, False] and True in ups[2:]

        recorder.wait_until(reconnected, "down, then up again")
        after_reconnect = confirmed()
        recorder.wait_until(
            lambda: confirmed() >= after_reconnect + 500, "500 confirms after the reconnect"
        )
    finally:
        done.set()
        with recorder.condition:
            recorder.condition.notify_all()
        loader.join(WAIT)
    assert not failures, failures
    assert not loader.is_alive()

    outcomes = recorder.wait_outcomes(len(handed))
    settled = by_tag(outcomes)
    assert set(settled) == set(handed)
    # In flight when the connection died (not merely refused while it was down).
    cut_off = [
        o
        for o in settled.values()
        if o.outcome is Outcome.UNKNOWN and (o.error or "").startswith("connection lost: ")
    ]
    assert cut_off, "the kill happened with nothing in flight"
    assert all(
        o.error in (NOT_CONNECTED, *(c.error for c in cut_off[:1]))
        for o in settled.values()
        if o.outcome is Outcome.UNKNOWN
    )
    assert not any(o.outcome is Outcome.REJECTED for o in settled.values())
    down = [s for s in recorder.statuses() if not s.up]
    assert down[0].error is not None and "320" in down[0].error
    assert not down[0].fatal


def test_publish_while_not_connected_is_unknown_at_once(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange()
    side.queue(exchange)
    publisher, recorder = make_publisher(exchange, start=False)

    publisher.publish([message(0, exchange), message(1, exchange)])
    # Synchronous: reported before publish() returns.
    assert recorder.outcomes() == [
        PublishOutcome(0, Outcome.UNKNOWN, NOT_CONNECTED),
        PublishOutcome(1, Outcome.UNKNOWN, NOT_CONNECTED),
    ]

    publisher.start()
    recorder.wait_up()
    publisher.stop(5.0)
    assert not publisher.ready
    before = len(recorder.outcomes())

    publisher.publish([message(2, exchange)])
    assert recorder.outcomes()[before:] == [PublishOutcome(2, Outcome.UNKNOWN, NOT_CONNECTED)]


def test_stop_is_bounded_idempotent_and_ends_the_thread(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange()
    side.queue(exchange)
    publisher, recorder = make_publisher(exchange)
    recorder.wait_up()
    assert publisher_thread_alive(publisher)
    publisher.publish([message(tag, exchange) for tag in range(300)])

    started = time.monotonic()
    publisher.stop(5.0)
    elapsed = time.monotonic() - started

    assert elapsed < 5.0
    assert not publisher_thread_alive(publisher)
    assert not publisher.ready
    # Whatever was in flight at stop got exactly one outcome (confirmed or unknown).
    settled = by_tag(recorder.outcomes())
    assert set(settled) == set(range(300))
    assert {o.outcome for o in settled.values()} <= {Outcome.CONFIRMED, Outcome.UNKNOWN}
    assert recorder.statuses()[-1].up is False
    publisher.stop(5.0)  # idempotent
    assert len(recorder.outcomes()) == 300
    with pytest.raises(RuntimeError):
        publisher.start()


def test_stop_without_start_is_safe(make_publisher: PublisherFactory) -> None:
    publisher, recorder = make_publisher("unused", start=False)

    publisher.stop(1.0)
    publisher.stop(1.0)

    assert recorder.events == []
    assert not publisher_thread_alive(publisher)


def test_exchange_with_another_type_is_fatal(
    side: SideBroker, make_publisher: PublisherFactory
) -> None:
    exchange = side.exchange(type="direct")
    publisher, recorder = make_publisher(exchange, exchange_type="topic")

    recorder.wait_until(lambda: any(s.fatal for s in recorder.statuses()), "a fatal status")
    thread = publisher_thread(publisher)
    if thread is not None:  # it may be gone already
        thread.join(WAIT)
    assert not publisher_thread_alive(publisher), "the publisher kept reconnecting"

    statuses = recorder.statuses()
    assert len(statuses) == 1  # no reconnect, no second "down"
    assert statuses[0].up is False
    assert statuses[0].error is not None and "406 PRECONDITION_FAILED" in statuses[0].error
    assert not publisher.ready


def test_unreachable_broker_retries_and_never_shows_the_password(
    make_publisher: PublisherFactory,
) -> None:
    # Port 1: nothing listens, so every attempt is refused at once.
    url = "amqp://guest:s3cr3t-pw@127.0.0.1:1/%2F"
    publisher, recorder = make_publisher(
        "unused", url=url, reconnect_wait_min=0.05, reconnect_wait_max=0.2
    )

    recorder.wait_until(lambda: len(recorder.statuses()) >= 3, "three failed attempts")
    publisher.publish([message(0, "unused")])

    statuses = recorder.statuses()
    assert all(not s.up and not s.fatal for s in statuses)
    assert all(s.error and "s3cr3t-pw" not in s.error for s in statuses)
    assert recorder.outcomes() == [PublishOutcome(0, Outcome.UNKNOWN, NOT_CONNECTED)]


@pytest.mark.parametrize(
    ("path_and_password", "says"),
    [
        (("%2F", "wrong-pw"), "refused the login"),
        (("no-such-vhost", "guest"), "refused the virtual host"),
    ],
)
def test_refused_login_or_vhost_at_start_is_fatal_in_one_status(
    make_publisher: PublisherFactory,
    caplog: pytest.LogCaptureFixture,
    path_and_password: tuple[str, str],
    says: str,
) -> None:
    """A wrong password or a missing vhost is refused the same way on every retry: the
    publisher reports one fatal, `refused` status that says what to fix, stops its thread,
    and neither it nor pika logs anything at WARNING or above."""
    vhost, password = path_and_password
    url = f"amqp://guest:{password}@127.0.0.1:5672/{vhost}"
    publisher, recorder = make_publisher("unused", url=url, reconnect_wait_min=0.05)

    recorder.wait_until(lambda: any(s.fatal for s in recorder.statuses()), "a fatal status")
    thread = publisher_thread(publisher)
    if thread is not None:
        thread.join(WAIT)
    assert not publisher_thread_alive(publisher), "the publisher kept retrying"
    statuses = recorder.statuses()
    assert len(statuses) == 1 and statuses[0].refused and not statuses[0].up
    assert statuses[0].error is not None and says in statuses[0].error
    assert "wrong-pw" not in statuses[0].error
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [f"{r.name}: {r.getMessage()}" for r in loud]


def test_unresolvable_host_is_retried_with_one_warning_per_attempt_naming_the_cause(
    make_publisher: PublisherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url = "amqp://guest:guest@no-such-host.invalid:5672/%2F"
    publisher, recorder = make_publisher(
        "unused", url=url, reconnect_wait_min=0.05, reconnect_wait_max=0.1
    )
    recorder.wait_until(lambda: len(recorder.statuses()) >= 3, "three failed attempts")
    publisher.stop(5.0)

    statuses = recorder.statuses()
    assert all(not s.fatal and not s.up for s in statuses)
    assert all(s.error and "Name or service not known" in s.error for s in statuses)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(r.name == "relay.publisher" for r in loud), [r.name for r in loud]
    assert all("Name or service not known" in r.getMessage() for r in loud)
    assert len(statuses) - 1 <= len(loud) <= len(statuses)  # one per attempt, at most


def test_run_with_a_wrong_broker_password_exits_4_with_one_line(
    pg_url: str, outbox_schema: Outbox
) -> None:
    """`run --until-empty` does not retry a refused login forever: exit 4, one error line,
    none of pika's noise, no password."""
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "run", "--until-empty"],
        env=relay_env(
            {
                "OUTBOX_DATABASE_URL": pg_url,
                "OUTBOX_AMQP_URL": "amqp://guest:wrong-pw@127.0.0.1:5672/%2F",
                "OUTBOX_SCHEMA": str(outbox_schema.schema),
            }
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 4, result.stderr
    assert "wrong-pw" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused the login" in errors[0], result.stderr
    assert "pika" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_list_of_nodes_connects_to_the_first_that_answers(
    side: SideBroker,
    make_publisher: PublisherFactory,
    amqp_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given two addresses, the first refusing connections, the publisher connects to the
    second without waiting out a backoff, reports that node, and publishes through it."""
    caplog.set_level(logging.INFO, logger="relay.publisher")
    exchange = side.exchange()
    side.queue(exchange)
    refusing = "amqp://guest:guest@127.0.0.1:1/%2F"
    publisher, recorder = make_publisher(
        exchange, url=f"{refusing},{amqp_url}", reconnect_wait_min=30, reconnect_wait_max=60
    )
    recorder.wait_up()  # well within the 30 s a backoff would take
    up = [s for s in recorder.statuses() if s.up]
    port = pika.URLParameters(amqp_url).port
    assert up[0].node == publisher.node == f"127.0.0.1:{port}"
    down = [s for s in recorder.statuses() if not s.up]
    assert len(down) == 1 and down[0].node == "127.0.0.1:1"

    publisher.publish([message(0, exchange)])
    assert by_tag(recorder.wait_outcomes(1))[0].outcome is Outcome.CONFIRMED
    connected = [r.getMessage() for r in caplog.records if "connected to node" in r.getMessage()]
    assert len(connected) == 1 and f"node 127.0.0.1:{port} " in connected[0]


def test_health_passes_when_one_node_of_the_list_answers(amqp_url: str) -> None:
    from relay.health import check_broker

    refusing = "amqp://guest:s3cr3t@127.0.0.1:1/%2F"
    assert check_broker(f"{refusing},{amqp_url}", timeout=5).ok
    failed = check_broker(f"{amqp_url.replace('5672', '1')},{refusing}", timeout=5)
    assert not failed.ok and "s3cr3t" not in failed.detail
