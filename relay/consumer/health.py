"""Health of a consumer group: its inbox tables answer, and each of its queues has a consumer."""

from __future__ import annotations

import contextlib

import pika.exceptions
import sqlalchemy as sa

from outbox.consumer import Inbox
from relay.consumer.app import check_tables
from relay.errors import BrokerUnavailableError, RelayError
from relay.health import Check, open_broker
from relay.urls import mask_url


def check_inbox(engine: sa.Engine, inbox: Inbox, database_url: str) -> Check:
    where = mask_url(database_url)
    try:
        check_tables(engine, inbox)
    except RelayError as exc:
        return Check("database", False, f"{exc} ({where})", exc)
    return Check("database", True, f"ok ({where}, inbox {inbox.messages.fullname})")


def check_queues(amqp_url: str, group: str, queues: int) -> Check:
    """Every queue `<group>.<i>` exists and has at least one consumer (active or standing by)."""
    where = mask_url(amqp_url)
    try:
        connection = open_broker(amqp_url, connection_name=f"outbox-consumer:health:{group}")
    except BrokerUnavailableError as exc:
        return Check("broker", False, f"{exc} ({where})", exc)
    problems, waiting = [], 0
    try:
        for index in range(queues):
            name = f"{group}.{index}"
            channel = connection.channel()
            try:
                declared = channel.queue_declare(name, passive=True).method
            except pika.exceptions.ChannelClosedByBroker:
                problems.append(f"queue {name} does not exist (no consumer of the group ran yet?)")
                continue
            waiting += int(declared.message_count or 0)
            if not declared.consumer_count:
                problems.append(f"queue {name} has no consumer")
            with contextlib.suppress(Exception):
                channel.close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        error = BrokerUnavailableError(f"broker connection lost during the check: {exc!r}")
        return Check("broker", False, f"{error} ({where})", error)
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    if problems:
        return Check("broker", False, "; ".join(problems) + f" ({where})")
    return Check(
        "broker", True, f"ok ({where}): {queues} queues, each consumed; {waiting} messages waiting"
    )
