"""The raw-pika baseline must publish exactly what it claims, or benchmark ratios are lies."""

from __future__ import annotations

import json

import pytest

from bench.baseline import BaselineError, _WindowedPublisher, raw_pika_throughput
from tests.support.history import Delivery, Written, check_history
from tests.support.rabbit import QueueTap, unique_name


def test_baseline_delivers_every_message_once_with_relay_properties() -> None:
    with QueueTap(prefix="bench-tap") as tap:
        exchange = tap.declare_exchange(unique_name("bench-events"))
        tap.bind(exchange, tap.queue)

        rate = raw_pika_throughput(500, keys=7, queue=tap.queue, exchange=exchange, window=64)
        deliveries = tap.drain(expected=501, timeout=1)  # one more: nothing extra may arrive

    assert rate > 0
    assert len(deliveries) == 500
    assert len({d.message_id for d in deliveries}) == 500
    # The ground truth is what the baseline promises to publish, not what arrived: seq 0 to
    # 499, keys cycling over k0..k6. Its message ids are random, so the history is checked
    # by seq: a missing, extra, repeated, mislabelled or reordered seq is caught.
    promised = [Written(f"seq-{seq}", f"k{seq % 7}", seq) for seq in range(500)]
    by_seq = [Delivery(f"seq-{d.seq}", d.key, d.seq) for d in deliveries]
    check_history(promised, by_seq).assert_ok()
    _, properties, body = tap.raw[0]
    assert properties.type == "bench.event"
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert len(body) == 200
    assert json.loads(body)["seq"] == deliveries[0].seq


def test_unroutable_messages_fail_the_run() -> None:
    with pytest.raises(BaselineError, match="5 returned unroutable"):
        raw_pika_throughput(5, keys=1, queue=unique_name("bench-nowhere"), exchange="")


def test_unreachable_broker_fails_fast() -> None:
    with pytest.raises(BaselineError, match="cannot connect"):
        raw_pika_throughput(
            1, keys=1, queue="q", exchange="", amqp_url="amqp://guest:guest@127.0.0.1:1/%2F"
        )


def test_rejects_nonsense_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        raw_pika_throughput(0, keys=1, queue="q", exchange="")


def test_confirm_bookkeeping_handles_out_of_order_and_multiple_acks() -> None:
    publisher = _WindowedPublisher(
        n=5,
        keys=1,
        queue="q",
        exchange="",
        window=5,
        body_size=10,
        amqp_url="amqp://guest:guest@127.0.0.1:5672/%2F",
        timeout=1,
    )
    publisher._outstanding.extend([1, 2, 3, 4, 5])

    assert publisher._settle(3, multiple=False) == 1
    assert publisher._settle(4, multiple=True) == 3  # 1, 2 and 4; 3 was already counted
    assert publisher._settle(3, multiple=False) == 0
    assert publisher._settle(2, multiple=True) == 0
    assert publisher._settle(5, multiple=False) == 1
    assert not publisher._outstanding
    assert not publisher._early
