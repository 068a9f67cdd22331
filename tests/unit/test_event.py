"""The event envelope validates at construction and is immutable."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid

import pytest

from outbox import Event, InvalidEventError, PayloadNotSerializableError
from outbox.encoding import encode_json
from outbox.writer import event_rows


def test_defaults() -> None:
    event = Event(type="order.placed", payload={"a": 1})
    assert event.key is None
    assert event.routing_key == "order.placed"
    assert event.version == 1
    assert event.occurred_at.tzinfo is dt.UTC
    assert event.id.version == 7


def test_ids_grow_with_time() -> None:
    ids = [Event(type="a.b").id for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000


def test_key_defaults_to_the_aggregate() -> None:
    event = Event(type="order.placed", aggregate_type="order", aggregate_id=uuid.UUID(int=5))
    assert event.key == f"order:{uuid.UUID(int=5)}"
    assert Event(type="t", aggregate_type="order", aggregate_id=1, key="custom").key == "custom"
    assert Event(type="t", key="k").aggregate_type is None


@pytest.mark.parametrize(
    ("fields", "given"),
    [({"aggregate_type": "order"}, "aggregate_type"), ({"aggregate_id": 7}, "aggregate_id")],
)
def test_an_aggregate_needs_both_type_and_id(fields: dict[str, object], given: str) -> None:
    # Before a flush a new order's id is None: such an event would silently have no key.
    with pytest.raises(InvalidEventError, match=f"{given} is set but .* flush .* record"):
        Event(type="order.placed", **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError, match="flush the session first"):
        Event(type="order.placed", aggregate_type="order", aggregate_id=None)


@pytest.mark.parametrize(
    "name", ["ordering-key", "aggregate-type", "aggregate-id", "event-version", "outbox-seq"]
)
def test_headers_the_relay_sets_are_refused(name: str) -> None:
    for spelling in (name, name.upper()):
        with pytest.raises(InvalidEventError, match="set by the relay"):
            Event(type="a.b", headers={spelling: "x"})


def test_reserved_headers_are_every_header_the_relay_sets() -> None:
    from outbox.event import RESERVED_HEADERS
    from relay.records import ClaimedEvent

    row = {
        **event_rows([Event(type="a.b", key="k", headers={"tenant": "acme"})])[0],
        "seq": 1,
        "attempts": 0,
    }
    message = ClaimedEvent.from_row(row, uuid.uuid4()).message("ex")
    assert set(message.headers) - {"tenant"} == RESERVED_HEADERS


@pytest.mark.parametrize(
    "field", ["type", "key", "aggregate_type", "aggregate_id", "routing_key", "correlation_id"]
)
def test_a_nul_byte_in_any_text_field_is_refused(field: str) -> None:
    fields: dict[str, object] = {"type": "a.b", "aggregate_type": "o", "aggregate_id": "1"}
    fields[field] = "bad\x00value"
    with pytest.raises(InvalidEventError, match="NUL byte"):
        Event(**fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError, match="NUL byte"):
        Event(type="a.b", headers={"h": "v\x00"})
    with pytest.raises(InvalidEventError, match="NUL byte"):
        Event(type="a.b", headers={"h\x00": "v"})


def test_frozen() -> None:
    event = Event(type="a.b", headers={"h": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.type = "c.d"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.headers["h"] = "w"  # type: ignore[index]


def test_occurred_at_is_converted_to_utc() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    event = Event(type="a.b", occurred_at=dt.datetime(2026, 1, 1, 12, tzinfo=cet))
    assert event.occurred_at == dt.datetime(2026, 1, 1, 11, tzinfo=dt.UTC)
    assert event.occurred_at.tzinfo is dt.UTC


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": ""}, "event type must not be empty"),
        ({"type": "order placed"}, "whitespace"),
        ({"type": "a\tb"}, "whitespace"),
        ({"type": 5}, "event type must be a str"),
        ({"type": "a.b", "headers": {"n": 1}}, "header 'n' has a int value"),
        ({"type": "a.b", "headers": {1: "v"}}, "header name 1"),
        ({"type": "a.b", "headers": [("a", "b")]}, "headers must be a mapping"),
        ({"type": "a.b", "version": 0}, "version must be 1 or more"),
        ({"type": "a.b", "version": "2"}, "version must be an int"),
        ({"type": "a.b", "occurred_at": dt.datetime(2026, 1, 1)}, "naive datetime"),
        ({"type": "a.b", "key": ""}, "ordering key must not be empty"),
        ({"type": "a.b", "routing_key": "a b"}, "routing_key 'a b' must not contain whitespace"),
        ({"type": "x" * 256}, "AMQP allows at most 255"),
        ({"type": "a.b", "aggregate_id": 1.5}, "aggregate_id must be a str, int or UUID"),
        ({"type": "a.b", "id": "not-a-uuid"}, "id must be a uuid.UUID"),
    ],
)
def test_bad_fields_are_refused_with_a_message_that_says_what_to_fix(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidEventError, match=message):
        Event(**fields)  # type: ignore[arg-type]


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Line:
    sku: str
    price: decimal.Decimal


def test_payload_encoding_of_common_python_values() -> None:
    value = {
        "line": Line("a", decimal.Decimal("1.10")),
        "day": dt.date(2026, 1, 2),
        "id": uuid.UUID(int=1),
        "colour": Colour.RED,
        "tags": {"b", "a"},
        "text": "grüße",
    }
    assert encode_json(value, what="payload") == (
        '{"line":{"sku":"a","price":"1.10"},"day":"2026-01-02",'
        '"id":"00000000-0000-0000-0000-000000000001","colour":"red",'
        '"tags":["a","b"],"text":"grüße"}'
    )


def test_unserialisable_payload_names_the_event_type() -> None:
    with pytest.raises(PayloadNotSerializableError, match="payload of order.placed event"):
        event_rows([Event(type="order.placed", payload=object())])


def test_a_header_name_over_255_bytes_is_refused_at_write_time() -> None:
    """A header name is an AMQP short string: the relay could never send the event."""
    Event(type="t", headers={"é" * 127 + "x": "v"})  # 255 bytes
    with pytest.raises(InvalidEventError, match="256 bytes; AMQP allows at most 255"):
        Event(type="t", headers={"é" * 128: "v"})
