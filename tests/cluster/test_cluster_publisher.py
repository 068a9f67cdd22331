"""The publisher against cluster nodes configured with a small `max_message_size`
(tests/cluster/nodes.py): the broker's own refusal of a large message, as a user with a
lower limit than RabbitMQ's default meets it."""

from __future__ import annotations

import pytest

from relay.channel_blame import DEFAULT_MAX_MESSAGE_SIZE
from relay.messages import Outcome
from relay.publisher import AmqpPublisher
from tests.cluster.nodes import MAX_MESSAGE_SIZE, Cluster
from tests.integration.test_publisher import Recorder, by_tag, message
from tests.support.rabbit import QueueTap, unique_name

pytestmark = pytest.mark.timeout(180)


def test_a_broker_limit_below_the_default_is_learned_from_its_first_refusal(
    rabbit_cluster: Cluster,
) -> None:
    """Given a broker whose max_message_size is below the publisher's default, when a batch
    holds one message over the broker's limit, then the broker closes the channel and only that
    message is REJECTED (for good, naming the broker's figure); the others are confirmed or
    come back UNKNOWN. The next large message is refused before it is sent: no second close."""
    node = rabbit_cluster.nodes[-1]
    assert node.running()
    with QueueTap(node.url, prefix="cluster-size") as tap:
        exchange = tap.declare_exchange(unique_name("cluster-size-ex"))
        tap.bind(exchange)
        recorder = Recorder()
        publisher = AmqpPublisher(
            node.url, recorder, connection_name=unique_name("size"), exchange=exchange
        )
        assert MAX_MESSAGE_SIZE < DEFAULT_MAX_MESSAGE_SIZE
        publisher.start()
        try:
            recorder.wait_up()
            big = b"x" * (MAX_MESSAGE_SIZE + 1)
            batch = [message(tag, exchange) for tag in range(20)]
            batch[10] = message(10, exchange, body=big)
            publisher.publish(batch)
            settled = by_tag(recorder.wait_outcomes(20))
            rejected = {t for t, o in settled.items() if o.outcome is Outcome.REJECTED}
            assert rejected == {10}
            assert not settled[10].retryable
            assert settled[10].error is not None
            assert f"max_message_size of {MAX_MESSAGE_SIZE} bytes" in settled[10].error
            assert all(settled[t].outcome is Outcome.UNKNOWN for t in range(11, 20))
            recorder.wait_up(times=2)

            publisher.publish([message(20, exchange, body=big), message(21, exchange)])
            settled = by_tag(recorder.wait_outcomes(22))
            assert settled[20].outcome is Outcome.REJECTED and not settled[20].retryable
            assert settled[21].outcome is Outcome.CONFIRMED
            assert [s.up for s in recorder.statuses()] == [True, False, True]
        finally:
            publisher.stop(5.0)
