"""The publisher driven by the relay's own loop (`loop=`, as the daemon runs it): its stop is
bounded even when the broker stops answering, and every message still gets one outcome."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from relay.mailbox import LoopMailbox
from relay.messages import Outcome, OutgoingMessage, PublisherEvent, PublishOutcome
from relay.publisher import AmqpPublisher
from tests.faults.proxy import FaultProxy
from tests.support.rabbit import QueueTap, unique_name


def message(tag: int, exchange: str) -> OutgoingMessage:
    return OutgoingMessage(
        tag=tag,
        exchange=exchange,
        routing_key="t",
        body=b"{}",
        message_id=str(uuid.uuid4()),
        type="t",
        timestamp=1_700_000_000,
        headers={},
        correlation_id=None,
    )


def driven_publisher(
    url: str, exchange: str, mailbox: LoopMailbox[Sequence[PublisherEvent]]
) -> AmqpPublisher:
    return AmqpPublisher(
        url,
        mailbox.put,
        connection_name=unique_name("test-driven"),
        exchange=exchange,
        loop=mailbox.loop,
    )


def start_until_ready(
    publisher: AmqpPublisher,
    mailbox: LoopMailbox[Sequence[PublisherEvent]],
    taken: list[PublisherEvent],
) -> None:
    """Start `publisher` and run the loop (keeping what it says) until it is ready."""
    publisher.start()
    deadline = time.monotonic() + 10
    while not publisher.ready and time.monotonic() < deadline:
        for batch in mailbox.take(0.1):
            taken.extend(batch)
    assert publisher.ready


def take_outcomes(
    mailbox: LoopMailbox[Sequence[PublisherEvent]], taken: list[PublisherEvent], count: int
) -> None:
    """Run the loop (keeping what it says) until `count` outcomes came, at most 5 s."""
    deadline = time.monotonic() + 5
    while len([e for e in taken if isinstance(e, PublishOutcome)]) < count:
        assert time.monotonic() < deadline
        for batch in mailbox.take(0.1):
            taken.extend(batch)


def test_stop_with_a_black_holed_broker_returns_in_time_and_settles_each_message_once() -> None:
    exchange = unique_name("test-driven-ex")
    mailbox: LoopMailbox[Sequence[PublisherEvent]] = LoopMailbox(asyncio.new_event_loop())
    taken: list[PublisherEvent] = []
    with FaultProxy("127.0.0.1", 5672) as proxy:
        publisher = driven_publisher(
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", exchange, mailbox
        )
        try:
            start_until_ready(publisher, mailbox, taken)
            proxy.blackhole()  # bytes vanish: no confirm, no close-ok, no reset
            publisher.publish([message(tag, exchange) for tag in range(1, 51)])
            for batch in mailbox.take(0.3):
                taken.extend(batch)
            started = time.monotonic()
            publisher.stop(timeout=1.0)
            assert time.monotonic() - started < 2.0
            for batch in mailbox.take(0):
                taken.extend(batch)
        finally:
            mailbox.close()
    outcomes = [e for e in taken if isinstance(e, PublishOutcome)]
    assert Counter(o.tag for o in outcomes) == Counter(range(1, 51))
    assert {o.outcome for o in outcomes} == {Outcome.UNKNOWN}


def test_a_message_whose_lease_ran_out_before_the_loop_sent_it_is_not_sent(
    amqp_url: str, tapped_exchange: tuple[QueueTap, str]
) -> None:
    """The relay hands messages over, then is frozen before its next wait (when the loop would
    send them) for longer than their lease: by then another relay may own their keys, so they
    come back UNKNOWN (given back, no attempt spent) and never reach the broker."""
    tap, exchange = tapped_exchange
    mailbox: LoopMailbox[Sequence[PublisherEvent]] = LoopMailbox(asyncio.new_event_loop())
    taken: list[PublisherEvent] = []
    publisher = driven_publisher(amqp_url, exchange, mailbox)
    try:
        start_until_ready(publisher, mailbox, taken)
        late = message(1, exchange)._replace(send_by=time.monotonic() + 0.2)
        unbound = message(2, exchange)
        publisher.publish([late, unbound])
        time.sleep(0.3)  # "frozen": the loop does not run until the lease is over
        take_outcomes(mailbox, taken, 2)
        publisher.stop(timeout=2.0)
    finally:
        mailbox.close()
    outcomes = {e.tag: e for e in taken if isinstance(e, PublishOutcome)}
    assert outcomes[1].outcome is Outcome.UNKNOWN and "lease ran out" in (outcomes[1].error or "")
    assert outcomes[2].outcome is Outcome.CONFIRMED
    assert [d.message_id for d in tap.drain(expected=2, timeout=1)] == [unbound.message_id]


def test_a_flush_sends_what_was_handed_over_without_the_loop_running(
    amqp_url: str, tapped_exchange: tuple[QueueTap, str]
) -> None:
    """`flush()` writes the messages handed over and pushes their frames onto the socket:
    they reach the broker while the loop does not run (a claim on the loop's thread waiting
    for its write), and their confirms come once it runs again."""
    tap, exchange = tapped_exchange
    mailbox: LoopMailbox[Sequence[PublisherEvent]] = LoopMailbox(asyncio.new_event_loop())
    taken: list[PublisherEvent] = []
    publisher = driven_publisher(amqp_url, exchange, mailbox)
    try:
        start_until_ready(publisher, mailbox, taken)
        sent = [message(tag, exchange) for tag in (1, 2)]
        publisher.publish(sent)
        publisher.flush()
        # The loop does not run while the broker gets them.
        assert [d.message_id for d in tap.drain(expected=2, timeout=2)] == [
            m.message_id for m in sent
        ]
        take_outcomes(mailbox, taken, 2)
        publisher.stop(timeout=2.0)
    finally:
        mailbox.close()
    outcomes = [e for e in taken if isinstance(e, PublishOutcome)]
    assert Counter(o.tag for o in outcomes) == {1: 1, 2: 1}
    assert all(o.outcome is Outcome.CONFIRMED for o in outcomes)
