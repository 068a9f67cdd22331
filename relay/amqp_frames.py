"""The AMQP 0-9-1 frames of one `basic.publish`, encoded without pika's per-message objects.

pika's `Channel.basic_publish` builds a `Basic.Publish`, a `BasicProperties`, three `Frame`
objects and some twenty byte pieces per message, and hands each frame to the transport on its
own (one `send()` system call per frame). Measured on the relay's hot path, that was about
half of the relay's CPU per event. `PublishEncoder.encode()` returns the same bytes in one
piece: the publisher joins a whole batch's and writes it once.

Why the bytes are the same as pika's (the test suite checks it byte for byte against pika,
over every property combination the relay sends and every header value type):

* frames: `type:u8 channel:u16 size:u32 payload 0xCE`; a method frame `basic.publish`
  (class 60, method 40: ticket 0, exchange and routing key as short strings, the mandatory
  bit), a content header (class 60, weight 0, body size, property flags, properties in flag
  order), then the body in frames of at most `frame_max - 8` bytes, none for an empty body;
* header values: str, int, bool and None, which make nearly all headers, are encoded here as
  pika encodes them (str as a long string "S", bool "t", int "I" when it fits 32 bits, else
  "l", None "V"); any other value (bytes, lists, tables, decimals, datetimes, and what pika
  refuses, floats among them) goes to pika's own `encode_value`, so nothing is encoded or
  refused differently;
* short strings longer than 255 bytes raise `pika.exceptions.ShortStringTooLong`, as pika
  does, before anything is written.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, cast

from pika import exceptions
from pika.adapters.utils.io_services_utils import (  # type: ignore[attr-defined]
    _AsyncPlaintextTransport,
)
from pika.channel import Channel
from pika.connection import Connection
from pika.data import encode_value

from relay.messages import OutgoingMessage

_FRAME_METHOD = 1
_FRAME_HEADER = 2
_FRAME_BODY = 3
_FRAME_END = b"\xce"
_FRAME_OVERHEAD = 8  # type, channel, size before the payload; the end octet after it

_BASIC_PUBLISH = struct.pack(">HH", 60, 40)
_MANDATORY = b"\x01"

# Property flags (AMQP 0-9-1, basic class), in the order their values follow the flags.
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_CORRELATION_ID = 1 << 10
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_APP_ID = 1 << 3

_PERSISTENT = b"\x02"  # delivery mode 2: an ack then means "on disk"
_INT32 = struct.Struct(">ci")
_INT64 = struct.Struct(">cq")
_FRAME_START = struct.Struct(">BHI")
# A content header frame up to its properties: frame start, class 60, weight 0, body size,
# property flags.
_HEADER_FRAME_START = struct.Struct(">BHIHxxQH")
_LONG_STRING = struct.Struct(">cI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TRUE = b"t\x01"
_FALSE = b"t\x00"
_VOID = b"V"
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

# Method frames by (exchange, routing key) and short strings many messages share: a relay
# publishes to a handful of routing keys and event types, so nearly every message finds its
# frame and strings cached. Bounded: a cache is cleared when it grows past this.
_CACHE_SIZE = 4096
# Frames are written in pieces of about this size (see `chunks`): a batch of a thousand
# small events is a few writes, and a partial send copies at most this much again.
CHUNK_SIZE = 128 * 1024
_FLAGS = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP | _TYPE | _APP_ID


class EncodingError(ValueError):
    """A message AMQP 0-9-1 cannot carry as it is: no connection would take it."""


class FrameTooLargeError(EncodingError):
    """A message whose content header would not fit in one frame of the connection."""


# What pika's encoding (and this module's) raises for a value AMQP cannot carry: a short
# string over 255 bytes or a value type tables have no field for (AMQPError), an int beyond
# 64 bits or a negative timestamp (struct.error), text that is not valid Unicode
# (UnicodeEncodeError), a decimal pika cannot scale (ArithmeticError), headers nested too
# deep for pika's recursion (RecursionError).
_ENCODING_FAILURES = (
    exceptions.AMQPError,
    struct.error,
    UnicodeEncodeError,
    ArithmeticError,
    RecursionError,
)


def short_string(value: str) -> bytes:
    """An AMQP short string: one length octet, then at most 255 bytes of UTF-8."""
    encoded = value.encode()
    if len(encoded) > 255:
        raise exceptions.ShortStringTooLong(encoded)
    return bytes((len(encoded),)) + encoded


class PublishEncoder:
    """Encodes `OutgoingMessage`s as the frames of a mandatory, persistent `basic.publish` on
    one channel, with the properties the relay sets (see the module docstring)."""

    def __init__(self, channel_number: int, frame_max: int) -> None:
        if frame_max <= _FRAME_OVERHEAD:
            raise ValueError(f"frame_max must be more than {_FRAME_OVERHEAD}, not {frame_max}")
        self._channel = channel_number
        self._body_max = frame_max - _FRAME_OVERHEAD
        self._methods: dict[tuple[str, str], bytes] = {}
        self._strings: dict[str, bytes] = {}

    def encode(self, message: OutgoingMessage) -> list[bytes]:
        """The frames of `message`: the method and header frames with the first body frame
        in one piece, then each further body frame (at most `frame_max` bytes each, so that
        a large body never makes one large piece; see `chunks`). Raises `EncodingError`
        for a message AMQP cannot carry."""
        try:
            return self._encode(message)
        except _ENCODING_FAILURES as exc:
            raise EncodingError(f"{exc!r}") from exc

    def _encode(self, message: OutgoingMessage) -> list[bytes]:
        constant = self._constant
        flags = _FLAGS
        properties = [
            constant(message.content_type),
            self._table(message.headers),
            _PERSISTENT,
        ]
        if message.correlation_id is not None:
            flags |= _CORRELATION_ID
            properties.append(short_string(message.correlation_id))
        properties.append(short_string(message.message_id))
        properties.append(_U64.pack(message.timestamp))
        properties.append(constant(message.type))
        properties.append(constant(message.app_id))
        encoded = b"".join(properties)
        # class, weight, body size and flags come before the properties: 14 bytes.
        if 14 + len(encoded) > self._body_max:
            # pika would send it, and the broker would close the connection (a frame larger
            # than frame_max), with every message in flight on it, on every attempt.
            raise FrameTooLargeError(
                f"its properties and headers take {14 + len(encoded)} bytes, more than a "
                f"frame holds ({self._body_max} bytes of the broker's frame_max "
                f"{self._body_max + _FRAME_OVERHEAD}); make its headers smaller"
            )
        body = message.body
        size = len(body)
        channel = self._channel
        first = [
            self._method_frame(message.exchange, message.routing_key),
            _HEADER_FRAME_START.pack(_FRAME_HEADER, channel, 14 + len(encoded), 60, size, flags),
            encoded,
            _FRAME_END,
        ]
        body_max = self._body_max
        if size <= body_max:
            if size:
                first += (_FRAME_START.pack(_FRAME_BODY, channel, size), body, _FRAME_END)
            return [b"".join(first)]
        frames = [b"".join(first)]
        view = memoryview(body)
        for start in range(0, size, body_max):
            fragment = view[start : start + body_max]  # no copy until the frame's join
            frames.append(
                b"".join(
                    (_FRAME_START.pack(_FRAME_BODY, channel, len(fragment)), fragment, _FRAME_END)
                )
            )
        return frames

    def _method_frame(self, exchange: str, routing_key: str) -> bytes:
        key = (exchange, routing_key)
        frame = self._methods.get(key)
        if frame is None:
            payload = (
                _BASIC_PUBLISH
                + b"\x00\x00"  # ticket
                + short_string(exchange)
                + short_string(routing_key)
                + _MANDATORY
            )
            frame = _FRAME_START.pack(_FRAME_METHOD, self._channel, len(payload)) + payload
            frame += _FRAME_END
            if len(self._methods) >= _CACHE_SIZE:
                self._methods.clear()
            self._methods[key] = frame
        return frame

    def _constant(self, value: str) -> bytes:
        """A short string that many messages share: content type, app id, event type, header
        name."""
        encoded = self._strings.get(value)
        if encoded is None:
            encoded = short_string(value)
            if len(self._strings) >= _CACHE_SIZE:
                self._strings.clear()
            self._strings[value] = encoded
        return encoded

    def _table(self, table: Mapping[str, Any]) -> bytes:
        """An AMQP field table, as `pika.data.encode_table` encodes it."""
        pieces: list[bytes] = []
        append = pieces.append
        constant = self._constant
        for name, value in table.items():
            append(constant(name))
            kind = type(value)
            if kind is str:
                encoded = value.encode()
                append(_LONG_STRING.pack(b"S", len(encoded)))
                append(encoded)
            elif kind is int and _INT32_MIN <= value <= _INT32_MAX:
                append(_INT32.pack(b"I", value))
            elif kind is int:
                append(_INT64.pack(b"l", value))  # struct.error beyond 64 bits, as pika
            elif value is None:
                append(_VOID)
            elif kind is bool:
                append(_TRUE if value else _FALSE)
            else:
                encode_value(pieces, value)
        encoded_table = b"".join(pieces)
        return _U32.pack(len(encoded_table)) + encoded_table


def frames_encoder(channel: Channel) -> PublishEncoder:
    """An encoder for `channel`, with the frame size its connection negotiated."""
    params = channel.connection.params
    if params is None:
        raise ValueError("the channel's connection has no parameters: it never opened")
    return PublishEncoder(channel.channel_number, params.frame_max)


def chunks(frames: Sequence[bytes], size: int = CHUNK_SIZE) -> list[bytes]:
    """Frames joined into pieces of about `size` bytes (a frame is never split): few writes
    for many small messages, and no piece much larger than a frame. The transport sends a
    piece from its start again after a partial send, copying the rest of it: one piece of a
    whole large batch would be copied over and over."""
    pieces: list[bytes] = []
    current: list[bytes] = []
    length = 0
    for frame in frames:
        if current and length + len(frame) > size:
            pieces.append(b"".join(current))
            current = []
            length = 0
        current.append(frame)
        length += len(frame)
    if current:
        pieces.append(b"".join(current))
    return pieces


def write_frames(connection: Connection, pieces: Sequence[bytes]) -> None:
    """Hand encoded frames to the connection's transport, one write per piece.

    pika has no public call for bytes that are already frames; `_output_marshaled_frames` is
    what its own `basic_publish` ends in (it counts the bytes for the heartbeat checker, then
    writes). `tests/unit/test_amqp_frames.py` checks that the installed pika still has it, and
    pyproject.toml bounds pika to the releases it was checked on.
    """
    cast(Any, connection)._output_marshaled_frames(pieces)


def send_written(connection: Connection) -> None:
    """Send what the connection's transport holds now, as far as the socket takes it.

    pika's transport only buffers a write, and sends it once the loop next finds the socket
    writable: a step that blocks after handing frames over (a claim on the loop's thread
    waiting for the write it carries) would hold them back. This is what the loop would call
    then (`_on_socket_writable`: it sends, keeps what the socket did not take, and stops
    watching the socket once nothing is left). Only the plaintext transport: under TLS the
    frames wait for the loop. `tests/unit/test_amqp_frames.py` checks that the installed
    pika still has these names.
    """
    transport = getattr(connection, "_transport", None)
    if (
        isinstance(transport, _AsyncPlaintextTransport)
        and transport._state == transport._STATE_ACTIVE
        and transport._tx_buffers
    ):
        transport._on_socket_writable()
