"""`Message`: one delivery as the consumer sees it, independent of the broker client."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from outbox.consumer.errors import ConsumerError

# The relay's headers (see relay/records.py); the consumer relies on exactly these.
ORDERING_KEY_HEADER = "ordering-key"
SEQ_HEADER = "outbox-seq"
VERSION_HEADER = "event-version"


class UndecodableMessageError(ConsumerError):
    """The message lacks what the consumer needs (id, type, version) or its body is not JSON."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message:
    """What the relay published: the event's id, type, version, key, seq and payload bytes.

    `message_id` is the dedup id. `problem` is set when the delivery could not be read (a
    missing `message_id`, a version that is not a number): such a message is parked, never
    dropped.
    """

    message_id: str
    type: str
    version: int = 1
    key: str | None = None
    seq: int | None = None
    body: bytes = b""
    headers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    routing_key: str | None = None
    problem: str | None = None

    @classmethod
    def from_delivery(
        cls,
        *,
        message_id: str | None,
        type: str | None,
        headers: Mapping[str, Any] | None,
        body: bytes,
        routing_key: str | None = None,
    ) -> Message:
        """Read a delivery; anything unusable is kept and described in `problem`."""
        headers = dict(headers or {})
        problems: list[str] = []
        key = headers.get(ORDERING_KEY_HEADER)
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        seq = _int_or_none(headers.get(SEQ_HEADER))
        if seq is not None and not 0 <= seq <= _MAX_BIGINT:
            problems.append(f"header {SEQ_HEADER}={seq} is out of range")
            seq = None
        raw_version = headers.get(VERSION_HEADER, 1)
        version = _int_or_none(raw_version)
        if version is None or not 1 <= version <= _MAX_INT:
            problems.append(f"header {VERSION_HEADER}={raw_version!r} is not a version number")
            version = 1
        if not message_id:
            problems.append("it has no message_id, so duplicates cannot be recognised")
        event_type = type or routing_key
        if not event_type:
            problems.append("it has no type property")
        # What the inbox stores must fit its columns, or parking it would fail as well and
        # the message would crash every consumer it reaches: unfit values are parked as a
        # safe stand-in (escaped, or cut with a digest), with the problem said.
        message_id = _storable(message_id or "", "message_id", problems)
        event_type = _storable(event_type or "", "type", problems)
        key = None if key is None else _storable(str(key), ORDERING_KEY_HEADER, problems)
        return cls(
            message_id=message_id,
            type=event_type,
            version=version,
            key=key,
            seq=seq,
            body=body,
            headers=headers,
            routing_key=routing_key,
            problem=("; ".join(problems) + ": publish it with the outbox relay")
            if problems
            else None,
        )

    def payload(self) -> Any:
        """The body as JSON, or UndecodableMessageError saying why not."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise UndecodableMessageError(
                f"the body of {self.type} message {self.message_id} is not JSON ({exc}); it "
                "must be what outbox.write() stored"
            ) from None


_MAX_INT = 2**31 - 1
_MAX_BIGINT = 2**63 - 1
_MAX_STORED = 255


def _storable(value: str, what: str, problems: list[str]) -> str:
    if "\x00" in value:
        problems.append(f"its {what} holds a NUL byte")
        value = value.replace("\x00", "\\x00")
    if len(value) > _MAX_STORED:
        problems.append(f"its {what} is longer than {_MAX_STORED} characters")
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        value = f"{value[: _MAX_STORED - 20]}...{digest}"
    return value


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None
