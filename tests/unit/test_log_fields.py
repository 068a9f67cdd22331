"""Structured logs: in JSON mode every line about one event carries its id, type and key as
top-level keys (and the attempt, the relay); text mode is what it was."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox import Event
from relay.dead_letter_log import DeadLetterLog
from relay.logs import (
    EVENT_FIELDS,
    _JsonFormatter,
    _MaskingFormatter,
    add_log_context,
    configure_logging,
    event_fields,
)
from relay.messages import Outcome
from relay.records import Failure
from tests.support.logs import assert_carries_event, json_log

from .test_relay_loop import Harness
from .test_sequencer import ev


def record(message: str = "m", **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("t")
    return logger.makeRecord("t", logging.WARNING, __file__, 1, message, (), None, extra=extra)


# -- the formatter ---------------------------------------------------------------------------


def test_json_lines_carry_the_event_fields_and_context_as_top_level_keys() -> None:
    event_id = uuid.uuid4()
    due = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    line = _JsonFormatter().format(
        record(
            "publish failed",
            **event_fields(event_id, "order.placed", "order:1", attempt=2, next_attempt_at=due),
            relay="relay-1",
        )
    )
    entry = json.loads(line)
    assert entry["message"] == "publish failed"
    assert entry["event_id"] == str(event_id)
    assert entry["event_type"] == "order.placed"
    assert entry["event_key"] == "order:1"
    assert entry["attempt"] == 2
    assert entry["next_attempt_at"] == "2026-01-01T12:00:00+00:00"
    assert entry["relay"] == "relay-1"


def test_a_keyless_event_has_a_null_key_and_lines_not_about_events_have_no_fields() -> None:
    keyless = json.loads(_JsonFormatter().format(record(**event_fields("id-1", "t", None))))
    assert keyless["event_key"] is None and "event_key" in keyless
    plain = json.loads(_JsonFormatter().format(record("broker connected")))
    assert not set(EVENT_FIELDS) & set(plain)
    assert set(plain) == {"time", "level", "logger", "message"}


def test_unknown_extras_are_not_emitted_and_field_values_are_masked() -> None:
    entry = json.loads(
        _JsonFormatter().format(
            record(reason="amqp://guest:secret@mq/ refused", something_else="x")
        )
    )
    assert entry["reason"] == "amqp://guest:***@mq/ refused"
    assert "something_else" not in entry


def test_event_fields_refuses_names_the_formatter_would_drop() -> None:
    with pytest.raises(ValueError, match="attemps"):
        event_fields("id", "t", "k", attemps=1)


def test_text_mode_is_unchanged_by_the_fields() -> None:
    formatter = _MaskingFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(record("event e1 failed", **event_fields("e1", "t", "k", attempt=1)))
    assert line == "WARNING t: event e1 failed"


@pytest.fixture
def root_handlers() -> Iterator[None]:
    saved = logging.getLogger().handlers[:]
    yield
    logging.getLogger().handlers[:] = saved


def test_the_daemons_name_is_on_every_line_once_added(
    root_handlers: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    add_log_context(relay="relay-7")
    logging.getLogger("relay").info("starting")
    logging.getLogger("relay").info("x", extra={"relay": "other"})  # an explicit value wins
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["relay"] for e in entries] == ["relay-7", "other"]
    with pytest.raises(ValueError, match="colour"):
        add_log_context(colour="red")


# -- the relay's lines about events ----------------------------------------------------------


def test_a_dead_letter_line_carries_the_event() -> None:
    event = ev(1, "order:9")._replace(attempts=2)
    dead = DeadLetterLog(logging.getLogger("relay"), lambda: 0.0)
    with json_log() as log:
        dead.dead(Failure(event=event, error="unroutable", next_attempt_at=None))
    [entry] = log.entries()
    assert_carries_event(entry, event.id, "t", "order:9")
    assert entry["attempt"] == 3


def test_every_relay_line_about_a_failing_event_carries_it(tmp_path: Path) -> None:
    """A real relay loop (SQLite store, a publisher that refuses one key): the retry warnings
    and the dead letter line of the refused event all carry its fields."""
    h = Harness(tmp_path, max_attempts=3, retry_min=10, retry_max=60)
    try:
        refused = Event(type="invoice.created", key="invoice:1")
        h.write(refused, Event(type="order.placed", key="order:1"))
        h.publisher.decide = lambda m: (
            Outcome.REJECTED if m.message_id == str(refused.id) else Outcome.CONFIRMED
        )
        with json_log() as log:
            for _ in range(3):
                h.settle_and_step()
                h.clock.advance(120)
                h.relay.wake()
        assert [r.status for r in h.rows()] == ["dead", "published"]
        about = log.about(refused.id)
        messages = [e["message"] for e in about]
        assert sum("failed, attempt" in m for m in messages) == 2, messages
        assert sum("is dead after 3 attempts" in m for m in messages) == 1, messages
        for entry in about:
            assert_carries_event(entry, refused.id, "invoice.created", "invoice:1")
        assert [e["attempt"] for e in about] == [1, 2, 3]
        assert [e.get("max_attempts") for e in about[:2]] == [3, 3]
    finally:
        h.engine.dispose()
