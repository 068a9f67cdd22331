"""`Message`: one delivery as the consumer sees it, independent of the broker client."""

from __future__ import annotations

import dataclasses
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
        problems = []
        key = headers.get(ORDERING_KEY_HEADER)
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        seq = _int_or_none(headers.get(SEQ_HEADER))
        raw_version = headers.get(VERSION_HEADER, 1)
        version = _int_or_none(raw_version)
        if version is None or version < 1:
            problems.append(f"header {VERSION_HEADER}={raw_version!r} is not a version number")
            version = 1
        if not message_id:
            problems.append("it has no message_id, so duplicates cannot be recognised")
        event_type = type or routing_key
        if not event_type:
            problems.append("it has no type property")
        return cls(
            message_id=message_id or "",
            type=event_type or "",
            version=version,
            key=None if key is None else str(key),
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
