"""`outbox-relay health` checks the exchange as `run` would declare it: it passes only where
`run` would not exit 6, and it creates nothing. Real RabbitMQ, CliRunner."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from pika.exchange_type import ExchangeType

from outbox import Outbox
from relay.cli import main
from tests.support.rabbit import unique_name


@pytest.fixture
def broker(amqp_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    yield connection.channel()
    connection.close()


@pytest.fixture
def sqlite_outbox(sqlite_url: str) -> str:
    engine = sa.create_engine(sqlite_url)
    Outbox().create(engine)
    engine.dispose()
    return sqlite_url


def cli(url: str, amqp_url: str, *args: str) -> Result:
    env = {"OUTBOX_DATABASE_URL": url, "OUTBOX_AMQP_URL": amqp_url}
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def exists(amqp_url: str, exchange: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        connection.channel().exchange_declare(exchange, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_health_fails_with_6_exactly_where_run_exits_6(
    sqlite_outbox: str, amqp_url: str, broker: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    exchange = unique_name("ex")
    broker.exchange_declare(exchange, exchange_type=ExchangeType.fanout, durable=True)
    try:
        result = cli(sqlite_outbox, amqp_url, "health", "--exchange", exchange)
        assert result.exit_code == 6, result.output
        line = result.output.splitlines()[2]  # one line per check, no log noise
        assert line.startswith("exchange  FAIL") and "--exchange-type" in line
        run = cli(sqlite_outbox, amqp_url, "run", "--exchange", exchange, "--until-empty")
        assert run.exit_code == 6, run.output  # the pairing the check promises

        fanout = ["--exchange", exchange, "--exchange-type", "fanout"]
        assert cli(sqlite_outbox, amqp_url, "health", *fanout).exit_code == 0
        assert cli(sqlite_outbox, amqp_url, "run", *fanout, "--until-empty").exit_code == 0
        # run never declares with --no-declare-exchange: the type does not matter then.
        undeclared = ["--exchange", exchange, "--no-declare-exchange"]
        assert cli(sqlite_outbox, amqp_url, "health", *undeclared).exit_code == 0
    finally:
        broker.exchange_delete(exchange)


def test_a_missing_exchange_passes_when_run_declares_it_and_nothing_is_created(
    sqlite_outbox: str, amqp_url: str
) -> None:
    exchange = unique_name("ex")
    result = cli(sqlite_outbox, amqp_url, "health", "--exchange", exchange, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and "run declares it" in report["exchange"]["detail"]
    assert not exists(amqp_url, exchange)

    refused = cli(
        sqlite_outbox, amqp_url, "health", "--exchange", exchange, "--no-declare-exchange"
    )
    assert refused.exit_code == 6 and "does not exist" in refused.output
    assert not exists(amqp_url, exchange)
