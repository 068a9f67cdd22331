"""Shared helpers of the consumer tests: messages as the relay publishes them."""

from __future__ import annotations

import uuid
from typing import Any

from outbox.consumer import Message
from outbox.encoding import encode_json


def order_message(
    order_id: str,
    n: int,
    *,
    seq: int | None = None,
    version: int = 3,
    payload: Any = None,
    message_id: str | None = None,
    body: bytes | None = None,
    type: str = "order.placed",
) -> Message:
    if payload is None:
        payload = {"order_id": order_id, "n": n, "total": "9.99", "currency": "EUR"}
        if version == 1:
            payload = {"order_id": order_id, "n": n, "amount": "9.99"}
        elif version == 2:
            payload = {"order_id": order_id, "n": n, "total": "9.99"}
    return Message(
        message_id=message_id or str(uuid.uuid4()),
        type=type,
        version=version,
        key=f"order:{order_id}",
        seq=seq if seq is not None else n,
        body=body if body is not None else encode_json(payload, what="test").encode(),
        headers={"ordering-key": f"order:{order_id}", "outbox-seq": seq if seq is not None else n},
        routing_key=type,
    )
