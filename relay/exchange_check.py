"""`outbox-relay health`'s exchange check: would `run` accept the broker's exchange?

`run` exits 6 when it declares its exchange (durable, of `--exchange-type`) and the broker
refuses, because an exchange of that name exists with other properties. The check asks the
broker the same question without changing anything: a passive declare says whether the
exchange exists; only if it does, the very declaration `run` makes follows, which on an
existing exchange creates nothing and fails exactly where `run`'s would. A missing exchange
is fine when `run` declares it, and a failure with --no-declare-exchange (every publish would
be refused). With --no-declare-exchange `run` never declares, so the type is not compared.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pika
import pika.exceptions
from pika.exchange_type import ExchangeType

from relay.errors import BrokerConfigError, BrokerUnavailableError
from relay.health import BROKER_TIMEOUT, Check, open_broker

NOT_FOUND = 404
PRECONDITION_FAILED = 406


def check_exchange(
    amqp_url: str,
    exchange: str,
    exchange_type: str,
    *,
    declare: bool,
    timeout: float = BROKER_TIMEOUT,
) -> Check:
    name = f"exchange {exchange!r}"
    if exchange == "":
        return Check("exchange", True, "ok (the default exchange always exists)")
    try:
        connection = open_broker(
            amqp_url, connection_name="outbox-relay:health-exchange", timeout=timeout
        )
    except BrokerUnavailableError as exc:
        return Check("exchange", False, f"not checked: {exc}", exc)
    try:
        with _quiet_pika():
            return _check(connection, name, exchange, exchange_type, declare)
    finally:
        with contextlib.suppress(Exception):
            connection.close()


@contextlib.contextmanager
def _quiet_pika() -> Iterator[None]:
    """pika logs every channel the broker closes at WARNING: here that is the answer asked
    for, reported in the check's own line."""
    logger = logging.getLogger("pika")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check(
    connection: pika.BlockingConnection,
    name: str,
    exchange: str,
    exchange_type: str,
    declare: bool,
) -> Check:
    try:
        try:
            connection.channel().exchange_declare(exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                return _refused(f"the broker refused to look up {name}: {exc.reply_text}")
            if declare:
                return Check(
                    "exchange",
                    True,
                    f"ok ({name} does not exist yet: run declares it, durable {exchange_type})",
                )
            return _refused(
                f"{name} does not exist and --no-declare-exchange is set: every publish would "
                "fail. Declare it, or let run declare it (drop --no-declare-exchange)"
            )
        if declare:
            try:
                connection.channel().exchange_declare(
                    exchange, exchange_type=ExchangeType(exchange_type), durable=True
                )
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == PRECONDITION_FAILED:
                    return _refused(
                        f"{name} exists with other properties than durable {exchange_type}, so "
                        f"run would exit 6 ({exc.reply_text}): pass its --exchange-type, or "
                        "delete it and let run declare it"
                    )
                return _refused(f"the broker refused to declare {name}: {exc.reply_text}")
        return Check("exchange", True, f"ok ({name}, {exchange_type})")
    except pika.exceptions.AMQPError as exc:
        error = BrokerUnavailableError(f"broker unavailable while checking {name}: {exc!r}")
        return Check("exchange", False, str(error), error)


def _refused(message: str) -> Check:
    return Check("exchange", False, message, BrokerConfigError(message))
