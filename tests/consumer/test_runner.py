"""The consumer runner on real RabbitMQ and PostgreSQL, stepped with run_once()."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from outbox.consumer import Message, Outcome, Processor, Result, RetryPolicy
from relay.consumer.runner import Consumer, ConsumerSettings
from tests.consumer.app import App, build
from tests.consumer.broker import cleaned_up, publish
from tests.consumer.support import order_message, terminate_handler_session
from tests.support.rabbit import rabbitmqctl, unique_name


@pytest.fixture
def app(pg_engine: sa.Engine, schema_name: str) -> App:
    app = build(schema_name, name=unique_name("grp"))
    app.create(pg_engine)
    return app


@pytest.fixture
def exchange() -> str:
    return unique_name("ex")


ConsumerFactory = Callable[..., Consumer]


@pytest.fixture
def make_consumer(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str
) -> Iterator[ConsumerFactory]:
    made: list[Consumer] = []

    def make(
        queues: int = 4,
        before_ack: Callable[[Message, Result], None] | None = None,
        **options: Any,
    ) -> Consumer:
        processor = Processor(
            app.handlers,
            sessionmaker(pg_engine),
            policy=RetryPolicy(max_attempts=2, retry_min=0.01, retry_max=0.01),
        )
        settings = ConsumerSettings(
            amqp_url=amqp_url,
            name=unique_name("c"),
            exchange=exchange,
            queues=queues,
            housekeeping_interval=0.05,
        )
        consumer = Consumer(processor, settings, before_ack=before_ack, **options)
        made.append(consumer)
        return consumer

    first = make()
    with cleaned_up(amqp_url, first.topology):
        made.clear()
        try:
            yield make
        finally:
            for consumer in made:
                consumer.close()


def step_until(
    consumers: list[Consumer], condition: Callable[[], bool], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        for consumer in consumers:
            consumer.run_once(timeout=0.05)


def booked(app: App, engine: sa.Engine) -> list[tuple[str, int]]:
    return [(o, n) for h, o, n in app.applied(engine) if h == "book"]


def test_messages_spread_over_queues_apply_once_in_key_order(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    consumer = make_consumer(queues=4)
    consumer.start()  # declares the topology before anything is published
    keys = [f"k{i}" for i in range(20)]
    messages = [
        order_message(k, n, seq=n * 100 + i) for n in range(1, 11) for i, k in enumerate(keys)
    ]
    publish(amqp_url, exchange, messages)
    publish(amqp_url, exchange, messages[:30])  # redelivered duplicates, same message_id
    step_until([consumer], lambda: len(booked(app, pg_engine)) >= 200)
    consumer.run_once(timeout=0.3)
    done = booked(app, pg_engine)
    assert sorted(done) == sorted((k, n) for n in range(1, 11) for k in keys)  # each once
    for key in keys:
        assert [n for k, n in done if k == key] == list(range(1, 11)), key


def test_queues_are_quorum_with_single_active_consumer_behind_a_consistent_hash_exchange(
    make_consumer: ConsumerFactory,
) -> None:
    consumer = make_consumer(queues=3)
    consumer.start()
    rows = json.loads(
        rabbitmqctl("list_queues", "name", "type", "arguments", "--formatter", "json")
    )
    mine = {r["name"]: r for r in rows if r["name"] in consumer.topology.queue_names}
    assert set(mine) == set(consumer.topology.queue_names)
    for row in mine.values():
        assert row["type"] == "quorum"
        assert ["x-single-active-consumer", "bool", True] in row["arguments"]
    exchanges = json.loads(
        rabbitmqctl("list_exchanges", "name", "type", "arguments", "--formatter", "json")
    )
    [hashed] = [e for e in exchanges if e["name"] == consumer.topology.hash_exchange]
    assert hashed["type"] == "x-consistent-hash"
    assert ["hash-header", "longstr", "ordering-key"] in hashed["arguments"]


class Crash(Exception):
    pass


def test_a_crash_between_commit_and_ack_makes_the_redelivery_a_skipped_duplicate(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    outcomes: list[Outcome] = []

    def crash(message: Message, result: Result) -> None:
        outcomes.append(result.outcome)
        raise Crash  # committed, never acked

    first = make_consumer(queues=1, before_ack=crash)
    first.start()
    publish(amqp_url, exchange, [order_message("1", 1)])
    with pytest.raises(Crash):
        step_until([first], lambda: False, timeout=30)
    first.close()  # the process is gone: the broker takes the unacked message back
    second = make_consumer(queues=1, before_ack=lambda m, r: outcomes.append(r.outcome))
    step_until([second], lambda: len(outcomes) == 2)
    assert outcomes == [Outcome.HANDLED, Outcome.DUPLICATE]
    assert booked(app, pg_engine) == [("1", 1)]


def test_a_failing_key_is_parked_while_others_flow_and_a_retry_resumes_it_in_order(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    consumer = make_consumer(queues=2)
    consumer.start()
    app.faults.fail_times["bad"] = 10**6
    publish(
        amqp_url,
        exchange,
        [
            order_message(k, n, seq=n * 10 + i)
            for n in (1, 2, 3)
            for i, k in enumerate(["bad", "ok"])
        ],
    )
    step_until(
        [consumer],
        lambda: len(booked(app, pg_engine)) == 3 and consumer.processor.parked_counts() == (3, 1),
    )
    assert booked(app, pg_engine) == [("ok", 1), ("ok", 2), ("ok", 3)]
    app.faults.fail_times["bad"] = 0
    with pg_engine.begin() as conn:
        consumer.processor.statements.request_retry(conn, key="order:bad")
    step_until([consumer], lambda: consumer.processor.parked_counts() == (0, 0))
    assert [n for k, n in booked(app, pg_engine) if k == "bad"] == [1, 2, 3]
    publish(amqp_url, exchange, [order_message("bad", 4, seq=99)])
    step_until([consumer], lambda: ("bad", 4) in booked(app, pg_engine))


def test_unknown_version_and_bad_payload_are_parked_and_acked(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    consumer = make_consumer(queues=1)
    consumer.start()
    publish(
        amqp_url,
        exchange,
        [
            order_message("a", 1, version=9),
            order_message("b", 1, body=b"\xff not json"),
            order_message("c", 1, version=1),
        ],
    )
    step_until([consumer], lambda: booked(app, pg_engine) == [("c", 1)])
    with pg_engine.connect() as conn:
        parked = consumer.processor.statements.parked(conn)
    assert [(p.message.key, p.reason) for p in parked] == [
        ("order:a", "undecodable"),
        ("order:b", "undecodable"),
    ]
    assert "version 9 is newer" in (parked[0].error or "")
    assert "is not JSON" in (parked[1].error or "")
    consumer.close()
    # Acked: a new consumer gets nothing more.
    again = make_consumer(queues=1)
    again.run_once(timeout=0.5)
    with pg_engine.connect() as conn:
        assert len(again.processor.statements.parked(conn)) == 2


def test_metrics_count_outcomes_latency_parked_keys_and_queue_depth(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    from relay.consumer.metrics import ConsumerMetrics

    consumer = make_consumer(queues=1)
    metrics = ConsumerMetrics(app.handlers.name)
    consumer.metrics = metrics
    consumer.processor.on_result = metrics.result
    consumer.start()
    app.faults.fail_times["bad"] = 10**6
    ok = order_message("ok", 1)
    publish(amqp_url, exchange, [ok, ok, order_message("bad", 1)])
    step_until([consumer], lambda: consumer.processor.parked_counts() == (1, 1))
    consumer._next_housekeeping = consumer._next_depth = 0  # due now
    consumer.run_once(timeout=0.05)
    group = app.handlers.name

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"consumer": group, **labels})

    assert value("outbox_consumer_messages_total", type="order.placed", outcome="handled") == 1
    assert value("outbox_consumer_messages_total", type="order.placed", outcome="duplicate") == 1
    assert value("outbox_consumer_messages_total", type="order.placed", outcome="parked") == 1
    assert value("outbox_consumer_handle_seconds_count", type="order.placed") == 3
    assert value("outbox_consumer_parked_keys") == 1
    assert value("outbox_consumer_parked_messages") == 1
    assert value("outbox_consumer_queue_messages", queue=consumer.topology.queue_names[0]) == 0


def test_without_the_plugin_the_consumer_says_to_enable_it_and_exits_6(
    make_consumer: ConsumerFactory,
) -> None:
    """The broker's answer to an unknown exchange type, which is what a missing plugin gives
    (the shared broker's plugin is left enabled: other tests need it)."""
    import dataclasses

    from relay.cli.exits import EXIT_TOPOLOGY, exit_code_for
    from relay.errors import BrokerConfigError

    consumer = make_consumer(queues=1)
    consumer.topology = dataclasses.replace(
        consumer.topology, hash_exchange_type="x-no-such-exchange-type"
    )
    with pytest.raises(BrokerConfigError, match="rabbitmq-plugins enable") as caught:
        consumer.start()
    assert exit_code_for(caught.value) == EXIT_TOPOLOGY


@contextlib.contextmanager
def running(consumer: Consumer) -> Iterator[None]:
    """consumer.run() in a thread, stopped (and its errors raised) at the end."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield
    finally:
        consumer.request_stop()
        thread.join(30)
    assert not thread.is_alive(), "the consumer did not stop"
    if errors:
        raise errors[0]


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


def test_run_reconnects_after_the_broker_closes_its_connection_and_loses_nothing(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    from tests.support.rabbit import close_connection_named

    consumer = make_consumer(queues=2)
    consumer.start()
    closed: list[int] = []

    def close_once(event: object) -> None:
        if not closed:  # mid-handler: this message's ack cannot be sent
            closed.append(close_connection_named(f"outbox-consumer:{consumer.settings.name}"))

    app.faults.inside_handler = close_once
    keys = ["a", "b", "c"]
    publish(
        amqp_url,
        exchange,
        [order_message(k, n, seq=n * 10 + i) for n in range(1, 11) for i, k in enumerate(keys)],
    )
    with running(consumer):
        wait_until(lambda: len(booked(app, pg_engine)) == 30)
    assert closed == [1]
    done = booked(app, pg_engine)
    for key in keys:
        assert [n for k, n in done if k == key] == list(range(1, 11))


def test_run_survives_the_database_killing_its_session_mid_handler(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    consumer = make_consumer(queues=1)
    consumer.start()
    killed: list[int] = []

    def kill_own_session(event: object) -> None:
        if not killed:
            killed.append(terminate_handler_session(pg_engine, app.inbox.schema))

    app.faults.inside_handler = kill_own_session
    publish(amqp_url, exchange, [order_message("a", n) for n in range(1, 6)])
    with running(consumer):
        wait_until(lambda: len(booked(app, pg_engine)) == 5)
    assert killed == [1]
    assert booked(app, pg_engine) == [("a", n) for n in range(1, 6)]
    with pg_engine.connect() as conn:
        assert consumer.processor.statements.parked(conn) == []


def test_a_pool_of_consumers_shares_the_queues_and_keeps_key_order(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str, make_consumer: ConsumerFactory
) -> None:
    from relay.consumer.pool import ConsumerPool, share_queues

    assert share_queues(4, 2) == [(0, 2), (1, 3)]
    assert share_queues(3, 3) == [(0,), (1,), (2,)]
    first = make_consumer(queues=4, queue_indexes=(0, 2))
    second = make_consumer(queues=4, queue_indexes=(1, 3), housekeeping=False)
    assert second.queues == (f"{second.topology.group}.1", f"{second.topology.group}.3")
    pool = ConsumerPool([first, second])
    keys = [f"k{i}" for i in range(12)]
    first.start()  # the topology, before publishing
    first.close()
    publish(
        amqp_url,
        exchange,
        [order_message(k, n, seq=n * 100 + i) for n in range(1, 11) for i, k in enumerate(keys)],
    )
    thread = threading.Thread(target=pool.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(booked(app, pg_engine)) == 120)
    finally:
        pool.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    done = booked(app, pg_engine)
    for key in keys:
        assert [n for k, n in done if k == key] == list(range(1, 11)), key


def test_queue_indexes_outside_the_group_are_refused(make_consumer: ConsumerFactory) -> None:
    from relay.errors import ConfigError

    consumer = make_consumer(queues=2)
    with pytest.raises(ConfigError, match=r"within 0\.\.1"):
        Consumer(consumer.processor, consumer.settings, queue_indexes=(0, 2))


def test_inbox_health_wants_the_tables_and_a_consumer_on_every_queue(
    app: App, pg_url: str, amqp_url: str, schema_name: str, make_consumer: ConsumerFactory
) -> None:
    from click.testing import CliRunner

    from relay.cli import main

    group = app.handlers.name
    base = ["inbox", "health", "--database-url", pg_url, "--amqp-url", amqp_url, "--queues", "2"]

    def health(*more: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, [*base, *more])
        return result.exit_code, result.output

    consumer = make_consumer(queues=2)
    consumer.start()
    code, output = health("--consumer", group, "--schema", schema_name)
    assert code == 0, output
    assert "2 queues, each consumed" in output
    consumer.close()
    code, output = health("--consumer", group, "--schema", schema_name, "--json")
    assert code == 1
    assert f"queue {group}.0 has no consumer" in json.loads(output)["broker"]["detail"]
    code, output = health("--consumer", group, "--schema", "no_such_schema")
    assert code == 5 and "inbox tables missing" in output
    code, output = health("--consumer", "never-ran", "--schema", schema_name)
    assert code == 1 and "queue never-ran.0 does not exist" in output


def test_events_with_their_own_routing_keys_reach_a_group_bound_by_pattern(
    app: App, pg_engine: sa.Engine, amqp_url: str, exchange: str
) -> None:
    from outbox.consumer import HandlerRegistrationError, Handlers

    with pytest.raises(HandlerRegistrationError, match="list of non-empty strings"):
        Handlers("x", routing_keys="orders.#")  # type: ignore[arg-type]
    handlers = Handlers(unique_name("grp"), app.events, inbox=app.inbox, routing_keys=["orders.#"])
    got: list[int] = []

    @handlers.on(app.order_placed)
    def record(event: Any, session: object) -> None:
        got.append(event.n)

    assert handlers.bindings == ("orders.#",)
    settings = ConsumerSettings(
        amqp_url=amqp_url, name=unique_name("c"), exchange=exchange, queues=1
    )
    consumer = Consumer(Processor(handlers, sessionmaker(pg_engine)), settings)
    with cleaned_up(amqp_url, consumer.topology):
        consumer.start()
        message = dataclasses.replace(order_message("1", 7), routing_key="orders.eu.placed")
        publish(amqp_url, exchange, [message])
        try:
            step_until([consumer], lambda: got == [7])
        finally:
            consumer.close()


def test_two_consumer_groups_each_receive_every_event(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    schema_name: str,
    make_consumer: ConsumerFactory,
) -> None:
    other = build(schema_name, name=unique_name("grp"))  # the same tables, another group
    mine = make_consumer(queues=2)
    settings = ConsumerSettings(
        amqp_url=amqp_url, name=unique_name("c"), exchange=exchange, queues=2
    )
    theirs = Consumer(Processor(other.handlers, sessionmaker(pg_engine)), settings)
    with cleaned_up(amqp_url, theirs.topology):
        mine.start()
        theirs.start()
        try:
            publish(amqp_url, exchange, [order_message(f"k{i}", 1) for i in range(10)])
            step_until([mine, theirs], lambda: len(booked(app, pg_engine)) == 20)
        finally:
            theirs.close()
    inbox = app.inbox.messages
    with pg_engine.connect() as conn:
        per_group = dict(
            conn.execute(
                sa.select(inbox.c.consumer, sa.func.count()).group_by(inbox.c.consumer)
            ).all()
        )
    assert per_group == {app.handlers.name: 10, other.handlers.name: 10}
