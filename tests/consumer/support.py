"""Shared helpers of the consumer tests: messages as the relay publishes them, session kills."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

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


def terminate_handler_session(engine: sa.Engine, schema: str) -> int:
    """Kill the handler's own session, from inside the handler; how many sessions it killed.

    That session is idle in a transaction whose last statement wrote an effect into `schema`.
    A test polling the effects from another thread is idle in a transaction too, between its
    SELECT and its rollback, so matching on the schema alone could kill the poller instead:
    only a session whose last statement is an INSERT matches.
    """
    with engine.connect() as other:
        return len(
            other.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                    "state = 'idle in transaction' AND datname = current_database() "
                    "AND pid <> pg_backend_pid() AND position(:schema in query) > 0 "
                    "AND query ILIKE 'INSERT INTO%'"
                ),
                {"schema": schema},
            ).all()
        )
