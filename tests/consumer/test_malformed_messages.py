"""Malformed messages (a NUL byte in the key, an id longer than the inbox stores, a version or
seq out of range) are parked with what to fix, never raised (found by review: parking them
failed too, and the message crashed every consumer it reached)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from outbox.consumer import Message, Outcome, Processor, RetryPolicy
from tests.consumer.app import App, build


@pytest.fixture
def app(pg_engine: sa.Engine, schema_name: str) -> App:
    app = build(schema_name)
    app.create(pg_engine)
    return app


@pytest.fixture
def processor(app: App, pg_engine: sa.Engine) -> Processor:
    return Processor(
        app.handlers,
        sessionmaker(pg_engine),
        policy=RetryPolicy(max_attempts=2, retry_min=0, retry_max=0),
        sleep=lambda s: None,
    )


def _delivery(headers: dict, message_id: str | None = "m-1", body: bytes | None = None) -> Message:
    body = body or b'{"order_id": "1", "n": 1, "total": "9.99", "currency": "EUR"}'
    return Message.from_delivery(
        message_id=message_id,
        type="order.placed",
        headers=headers,
        body=body,
        routing_key="order.placed",
    )


# -- poison messages: process() raises instead of parking; run() dies, redelivery loops -------


def test_key_with_nul_byte_is_parked_not_raised(processor: Processor) -> None:
    message = _delivery({"ordering-key": "order:\x001", "outbox-seq": 1, "event-version": 3})
    assert processor.process(message).outcome is Outcome.PARKED


def test_overlong_message_id_is_parked_not_raised(processor: Processor) -> None:
    message = _delivery(
        {"ordering-key": "order:1", "outbox-seq": 1, "event-version": 3}, message_id="x" * 300
    )
    assert processor.process(message).outcome is Outcome.PARKED


def test_version_beyond_int32_is_parked_not_raised(processor: Processor) -> None:
    message = _delivery({"ordering-key": "order:1", "outbox-seq": 1, "event-version": 2**31})
    assert processor.process(message).outcome is Outcome.PARKED


def test_seq_beyond_bigint_is_parked_not_raised(processor: Processor) -> None:
    message = _delivery({"ordering-key": "order:1", "outbox-seq": 2**63, "event-version": 3})
    assert processor.process(message).outcome is Outcome.PARKED


# -- a message without message_id, redelivered, is parked twice and applied twice on retry ---


def test_sound_keyed_message_without_id_redelivered_applies_once_after_retry(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    message = _delivery(
        {"ordering-key": "order:1", "outbox-seq": 1, "event-version": 3}, message_id=None
    )
    assert processor.process(message).outcome is Outcome.PARKED
    # crash between the park's commit and the ack: the broker delivers it again
    assert processor.process(message).outcome is Outcome.PARKED
    with pg_engine.begin() as conn:
        processor.statements.request_retry(conn, key="order:1")
    processor.retry_requested()
    book = [e for e in app.applied(pg_engine) if e[0] == "book"]
    assert book == [("book", "1", 1)], book


# -- an unreadable version header is stored as version 1: a retry decodes v3 data as v1 ------


# -- a BaseException from a handler escapes process(): not parked, not acked, consumer dies --


class _Fatal(BaseException):
    pass


# -- between a failing message's attempts its key is neither locked nor parked: a later ------
# -- message of the key (on another queue after a ring change) is applied ahead of it --------
