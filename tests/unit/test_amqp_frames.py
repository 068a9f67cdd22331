"""`relay.amqp_frames` sends exactly the bytes pika's `basic_publish` would send.

pika is the oracle: every case publishes one message both ways (pika's own
`Channel.basic_publish` down to its transport, with the publisher's properties) and compares
the bytes; a value pika refuses must be refused here too, with the same exception type.
"""

from __future__ import annotations

import datetime as dt
import decimal
import random
import socket
import struct
from typing import Any, cast

import pika
import pytest
from pika import exceptions
from pika.adapters.utils.io_services_utils import (  # type: ignore[attr-defined]
    _AsyncPlaintextTransport,
)
from pika.channel import Channel
from pika.connection import Connection

from bench.baseline import properties_of
from relay.amqp_frames import (
    EncodingError,
    FrameTooLargeError,
    PublishEncoder,
    chunks,
    send_written,
    write_frames,
)
from relay.messages import OutgoingMessage

FRAME_MAX = 131_072  # RabbitMQ's default


def message(**overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "tag": 1,
        "exchange": "orders",
        "routing_key": "order.placed",
        "body": b'{"n": 1}',
        "message_id": "0191c6a2-7b4c-7c7d-9e2f-2b1c3d4e5f60",
        "type": "order.placed",
        "timestamp": 1_700_000_000,
        "headers": {
            "ordering-key": "k1",
            "aggregate-type": None,
            "aggregate-id": None,
            "event-version": 1,
            "outbox-seq": 42,
        },
        "correlation_id": None,
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


class CapturingConnection(Connection):
    """pika's own `Connection`, open, with a transport that keeps what it is given: the
    oracle runs pika's real `Channel.basic_publish` down to the bytes it would send."""

    def __init__(self, frame_max: int) -> None:
        self.written: list[bytes] = []
        params = pika.ConnectionParameters(frame_max=frame_max)
        super().__init__(params, None, None, None, internal_connection_workflow=False)
        self._body_max_length = self._get_body_frame_max_length()
        self.connection_state = Connection.CONNECTION_OPEN

    def _adapter_emit_data(self, data: bytes) -> None:
        self.written.append(data)

    def _adapter_connect_stream(self) -> None:
        pass

    def _adapter_disconnect_stream(self) -> None:
        pass

    def _adapter_call_later(self, delay: float, callback: Any) -> Any:
        return None

    def _adapter_remove_timeout(self, timeout_id: Any) -> None:
        pass

    def _adapter_add_callback_threadsafe(self, callback: Any) -> None:
        pass

    def _adapter_get_write_buffer_size(self) -> int:
        return 0


def pika_bytes(m: OutgoingMessage, channel: int = 1, frame_max: int = FRAME_MAX) -> bytes:
    """What pika's `Channel.basic_publish` sends for `m` with the publisher's properties."""
    connection = CapturingConnection(frame_max)
    pika_channel = Channel(connection, channel, lambda *_: None)
    pika_channel._set_state(Channel.OPEN)
    pika_channel.basic_publish(m.exchange, m.routing_key, m.body, properties_of(m), mandatory=True)
    return b"".join(connection.written)


def ours(m: OutgoingMessage, channel: int = 1, frame_max: int = FRAME_MAX) -> bytes:
    frames = PublishEncoder(channel, frame_max).encode(m)
    assert all(len(frame) <= frame_max for frame in frames[1:])
    return b"".join(frames)


def test_the_relays_usual_message_is_encoded_as_pika_encodes_it() -> None:
    m = message()
    assert ours(m) == pika_bytes(m)


@pytest.mark.parametrize("correlation_id", [None, "", "corr-1", "ü" * 127])
@pytest.mark.parametrize("content_type", ["application/json", "", "text/plain; charset=utf-8"])
@pytest.mark.parametrize("app_id", ["outbox-relay", ""])
def test_every_property_combination_the_relay_sends(
    correlation_id: str | None, content_type: str, app_id: str
) -> None:
    m = message(correlation_id=correlation_id, content_type=content_type, app_id=app_id)
    assert ours(m) == pika_bytes(m)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain",
        "ünïcødé ✓",
        "x" * 70_000,  # a long string: 32-bit length, not a short string
        0,
        -1,
        2**31 - 1,  # the last int pika sends as a 32-bit "I"
        -(2**31),
        2**31,  # the first it sends as a 64-bit "l"
        -(2**31) - 1,
        2**63 - 1,
        -(2**63),
        True,
        False,
        None,
        b"\x00raw",
        [1, "a", None, True, [2]],
        [],
        {"nested": {"deeper": 1}, "s": "v"},
        {},
        decimal.Decimal("12.50"),
        decimal.Decimal("7"),
        dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC),
    ],
    ids=repr,
)
def test_every_header_value_type(value: Any) -> None:
    m = message(headers={"ordering-key": "k1", "value": value})
    assert ours(m) == pika_bytes(m)


class IntFlag(int):
    """An int subclass: pika's isinstance rules apply to it, not the exact-type fast path."""


def test_subclasses_of_str_and_int_are_encoded_as_pika_encodes_them() -> None:
    class Name(str):
        pass

    m = message(headers={"a": Name("x"), "b": IntFlag(5), "c": IntFlag(2**40)})
    assert ours(m) == pika_bytes(m)


@pytest.mark.parametrize(
    "value",
    [1.5, 2**63, -(2**63) - 1, object(), {1, 2}, "\ud800"],
    ids=[
        "float",
        "int beyond 64 bits",
        "int below 64 bits",
        "object",
        "set",
        "lone surrogate",
    ],
)
def test_a_header_value_pika_refuses_is_refused_with_the_same_error(value: Any) -> None:
    m = message(headers={"value": value})
    with pytest.raises(Exception) as theirs:
        pika_bytes(m)
    with pytest.raises(EncodingError) as refused:
        ours(m)
    assert type(refused.value.__cause__) is type(theirs.value)


@pytest.mark.parametrize("field", ["exchange", "routing_key", "message_id", "type", "app_id"])
def test_short_strings_take_255_bytes_and_refuse_256(field: str) -> None:
    at_limit = message(**{field: "é" * 127 + "x"})  # 255 bytes of UTF-8
    assert ours(at_limit) == pika_bytes(at_limit)
    over = message(**{field: "é" * 128})  # 256 bytes
    with pytest.raises(exceptions.ShortStringTooLong):
        pika_bytes(over)
    with pytest.raises(EncodingError, match="ShortStringTooLong"):
        ours(over)


def test_header_names_are_short_strings_too() -> None:
    assert ours(message(headers={"n" * 255: 1})) == pika_bytes(message(headers={"n" * 255: 1}))
    with pytest.raises(EncodingError, match="ShortStringTooLong"):
        ours(message(headers={"n" * 256: 1}))


@pytest.mark.parametrize("size", [0, 1, 4088 - 1, 4088, 4088 + 1, 3 * 4088, 3 * 4088 + 5])
def test_bodies_are_split_into_frames_of_frame_max(size: int) -> None:
    """frame_max 4096: body frames carry at most 4088 bytes; an empty body has none."""
    m = message(body=bytes(random.Random(size).randrange(256) for _ in range(size)))
    assert ours(m, frame_max=4096) == pika_bytes(m, frame_max=4096)


@pytest.mark.parametrize("channel", [1, 2, 255, 256, 65_535])
def test_the_channel_number_is_in_every_frame(channel: int) -> None:
    m = message(body=b"y" * 10_000)
    assert ours(m, channel=channel, frame_max=4096) == pika_bytes(
        m, channel=channel, frame_max=4096
    )


def test_negative_timestamps_are_refused_as_pika_refuses_them() -> None:
    with pytest.raises(struct.error):
        pika_bytes(message(timestamp=-1))
    with pytest.raises(EncodingError) as refused:
        ours(message(timestamp=-1))
    assert isinstance(refused.value.__cause__, struct.error)


def test_one_encoder_gives_each_message_its_own_frames() -> None:
    """The encoder keeps method frames by (exchange, routing key): a later message never
    gets an earlier one's routing, and the cache's bound does not change the bytes."""
    encoder = PublishEncoder(1, FRAME_MAX)
    rng = random.Random(7)
    for i in range(5000):
        m = message(
            exchange=rng.choice(["a", "b", ""]),
            routing_key=f"rk.{rng.randrange(6000)}",
            type=f"t{rng.randrange(5000)}",
            message_id=f"id-{i}",
            correlation_id=rng.choice([None, f"c{i}"]),
            body=b"z" * rng.randrange(200),
        )
        assert b"".join(encoder.encode(m)) == pika_bytes(m), m


def test_random_headers_match_pika() -> None:
    rng = random.Random(15)

    def value(depth: int) -> Any:
        kinds = ["s", "i", "big", "b", "n", "bytes"] + (["l", "d"] if depth < 3 else [])
        kind = rng.choice(kinds)
        if kind == "s":
            return "".join(rng.choice("aé✓ \x00") for _ in range(rng.randrange(8)))
        if kind == "i":
            return rng.randrange(-(2**31), 2**31)
        if kind == "big":
            return rng.choice([-1, 1]) * rng.randrange(2**31, 2**63)
        if kind == "b":
            return rng.random() < 0.5
        if kind == "n":
            return None
        if kind == "bytes":
            return rng.randbytes(rng.randrange(5))
        if kind == "l":
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{j}": value(depth + 1) for j in range(rng.randrange(4))}

    for _ in range(500):
        headers = {f"h{j}": value(0) for j in range(rng.randrange(8))}
        m = message(headers=headers)
        assert ours(m) == pika_bytes(m), headers


def test_frame_max_must_leave_room_for_a_body() -> None:
    with pytest.raises(ValueError, match="frame_max"):
        PublishEncoder(1, 8)


def test_frames_written_through_pikas_private_call_reach_its_transport_as_pikas_own() -> None:
    """`write_frames` relies on pika's `_output_marshaled_frames` (pika has no public call
    for frames): through the installed pika's Connection, the relay's pieces reach the
    transport as the bytes pika's own publish writes, and count the same for its heartbeat
    checker."""
    m = message(body=b"b" * 10_000, headers={"ordering-key": "k", "n": 2**40})
    theirs = CapturingConnection(4096)
    pika_channel = Channel(theirs, 7, lambda *_: None)
    pika_channel._set_state(Channel.OPEN)
    pika_channel.basic_publish(m.exchange, m.routing_key, m.body, properties_of(m), mandatory=True)
    ours = CapturingConnection(4096)
    write_frames(ours, chunks(PublishEncoder(7, 4096).encode(m)))
    assert b"".join(ours.written) == b"".join(theirs.written)
    assert ours.bytes_sent == theirs.bytes_sent


def test_a_large_body_comes_as_one_piece_per_frame() -> None:
    """Never one piece of the whole body: the transport copies the rest of a piece after a
    partial send, which for one piece of many megabytes is quadratic."""
    m = message(body=b"b" * (10 * 4088 + 3))
    frames = PublishEncoder(1, 4096).encode(m)
    assert len(frames) == 1 + 11
    assert all(len(frame) <= 4096 for frame in frames[1:])
    assert b"".join(frames) == pika_bytes(m, frame_max=4096)


def test_a_small_message_is_one_piece() -> None:
    assert len(PublishEncoder(1, FRAME_MAX).encode(message())) == 1


def test_a_content_header_larger_than_a_frame_is_refused() -> None:
    """pika would send it and the broker would close the connection (a frame over
    frame_max), with every message in flight on it, on every attempt of this one."""
    encoder = PublishEncoder(1, 4096)
    fits = len(PublishEncoder(1, FRAME_MAX).encode(message(body=b""))[0])
    # The header frame's payload of message(): everything but the method frame and 8 bytes.
    method = len(PublishEncoder(1, FRAME_MAX)._method_frame("orders", "order.placed"))
    header_payload = fits - method - 8
    pad = 4088 - header_payload - len("x") - 1 - 5  # name's length octet, "S" + length
    at_limit = message(headers={**message().headers, "x": "p" * pad})
    assert b"".join(encoder.encode(at_limit)) == pika_bytes(at_limit, frame_max=4096)
    over = message(headers={**message().headers, "x": "p" * (pad + 1)})
    with pytest.raises(FrameTooLargeError, match="make its headers smaller"):
        encoder.encode(over)


def test_chunks_join_small_frames_and_never_split_one() -> None:
    frames = [bytes([i]) * 100 for i in range(25)] + [b"L" * 1000] + [b"s" * 10]
    pieces = chunks(frames, size=1000)
    assert b"".join(pieces) == b"".join(frames)
    assert [len(p) for p in pieces] == [1000, 1000, 500, 1000, 10]
    assert chunks([]) == []


def test_headers_nested_past_the_encoders_recursion_are_refused_for_good() -> None:
    """JSON parses deeper than pika's encoder recurses: such headers are a message AMQP (as
    pika writes it) cannot carry, not a passing failure."""
    deep: dict[str, object] = {}
    for _ in range(2000):
        deep = {"d": deep}
    with pytest.raises(EncodingError, match="RecursionError"):
        ours(message(headers={"deep": deep}))


class RecordingIO:
    """The descriptor services pika's transport asks to watch its socket."""

    def __init__(self) -> None:
        self.writers: set[int] = set()

    def set_reader(self, fd: int, _on_readable: object) -> None:
        pass

    def set_writer(self, fd: int, _on_writable: object) -> None:
        self.writers.add(fd)

    def remove_writer(self, fd: int) -> bool:
        had = fd in self.writers
        self.writers.discard(fd)
        return had


class TransportOnly:
    """What `send_written` reads of a connection: its transport."""

    def __init__(self, transport: object) -> None:
        self._transport = transport


def test_send_written_sends_what_pikas_transport_holds_without_the_loop() -> None:
    """`send_written` relies on the installed pika's plaintext transport: a write only
    buffers (sent when the loop next finds the socket writable); `send_written` sends it at
    once and the transport stops watching for writability, as after the loop's own send."""
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        io = RecordingIO()
        transport = _AsyncPlaintextTransport(ours, object(), io)
        transport.write(b"frames")
        assert io.writers == {ours.fileno()}
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)  # buffered, not sent
        send_written(cast(Connection, TransportOnly(transport)))
        assert theirs.recv(100) == b"frames"
        assert io.writers == set() and not transport._tx_buffers
        send_written(cast(Connection, TransportOnly(transport)))  # nothing held: nothing done
        send_written(cast(Connection, TransportOnly(None)))  # not connected: nothing done
    finally:
        ours.close()
        theirs.close()
