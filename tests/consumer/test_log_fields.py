"""The consumer's lines about one message, in the relay CLI's JSON format, carry the event's
id, type and key (and seq, attempt, reason): handler failures, parking, stale messages,
duplicates and replays, on a real PostgreSQL inbox."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from outbox.consumer import Outcome, Processor, RetryPolicy
from tests.consumer.app import build
from tests.consumer.support import order_message
from tests.support.logs import assert_carries_event, json_log


def test_every_line_about_a_failing_parked_and_replayed_message_carries_it(
    pg_engine: sa.Engine, schema_name: str
) -> None:
    app = build(schema_name)
    app.create(pg_engine)
    processor = Processor(
        app.handlers,
        sessionmaker(pg_engine),
        policy=RetryPolicy(max_attempts=2, retry_min=0.01, retry_max=0.01),
        sleep=lambda seconds: None,
    )
    failing = order_message("bad", 1, seq=1)
    stale = order_message("good", 1, seq=5)
    app.faults.fail_times["bad"] = 10**6
    with json_log() as log:
        # A handler that keeps failing: two attempts, then the message and its key are parked.
        assert processor.process(failing).outcome is Outcome.PARKED
        # An older seq after a newer one: parked as stale. A redelivery: a duplicate.
        assert processor.process(order_message("good", 2, seq=9)).outcome is Outcome.HANDLED
        assert processor.process(stale).outcome is Outcome.STALE
        handled = order_message("good", 3, seq=10)
        assert processor.process(handled).outcome is Outcome.HANDLED
        assert processor.process(handled).outcome is Outcome.DUPLICATE
        # An operator's retry replays the parked message once the handler works.
        app.faults.fail_times["bad"] = 0
        with pg_engine.begin() as conn:
            assert processor.statements.request_retry(conn, key="order:bad") == 1
        assert processor.retry_requested() == 1

    about_failing = log.about(failing.message_id)
    messages = [e["message"] for e in about_failing]
    assert sum(m.startswith("handler failed on") for m in messages) == 2, messages
    assert sum(m.startswith("parked ") for m in messages) == 1, messages
    assert sum(m.startswith("replayed parked ") for m in messages) == 1, messages
    for entry in about_failing:
        assert_carries_event(entry, failing.message_id, "order.placed", "order:bad")
        assert entry["seq"] == 1
    failures = [e for e in about_failing if e["message"].startswith("handler failed")]
    assert [(e["attempt"], e["max_attempts"]) for e in failures] == [(1, 2), (2, 2)]
    parked = next(e for e in about_failing if e["message"].startswith("parked "))
    assert (parked["attempt"], parked["reason"]) == (2, "failed")

    [stale_line] = log.about(stale.message_id)
    assert_carries_event(stale_line, stale.message_id, "order.placed", "order:good")
    assert stale_line["reason"] == "stale"
    [duplicate_line] = log.about(handled.message_id)
    assert_carries_event(duplicate_line, handled.message_id, "order.placed", "order:good")
