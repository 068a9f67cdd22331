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
from tests.support.rabbit import unique_name


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


def test_stop_with_a_black_holed_broker_returns_in_time_and_settles_each_message_once() -> None:
    exchange = unique_name("test-driven-ex")
    mailbox: LoopMailbox[Sequence[PublisherEvent]] = LoopMailbox(asyncio.new_event_loop())
    taken: list[PublisherEvent] = []
    with FaultProxy("127.0.0.1", 5672) as proxy:
        publisher = AmqpPublisher(
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
            mailbox.put,
            connection_name=unique_name("test-driven"),
            exchange=exchange,
            loop=mailbox.loop,
        )
        try:
            publisher.start()
            deadline = time.monotonic() + 10
            while not publisher.ready and time.monotonic() < deadline:
                for batch in mailbox.take(0.1):
                    taken.extend(batch)
            assert publisher.ready
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
