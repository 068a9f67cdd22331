"""`outbox-relay consume` processes: SIGKILL mid-handler, SIGTERM, failover, parked retry."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox.consumer.admin import ParkedAdmin
from relay.cli import main
from relay.consumer.topology import Topology
from tests.consumer.app import App, build
from tests.consumer.broker import cleaned_up, publish
from tests.consumer.processes import ConsumerProcess, consumer_processes, wait_for
from tests.consumer.support import order_message
from tests.support.rabbit import unique_name

pytestmark = pytest.mark.slow


@pytest.fixture
def app(pg_engine: sa.Engine, schema_name: str) -> App:
    app = build(schema_name, name=unique_name("grp"))
    app.create(pg_engine)
    return app


@pytest.fixture
def exchange(app: App, amqp_url: str) -> Iterator[str]:
    name = unique_name("ex")
    topology = Topology(
        group=app.handlers.name, exchange=name, routing_keys=app.handlers.bindings, queues=2
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    topology.declare(connection.channel())
    connection.close()
    with cleaned_up(amqp_url, topology):
        yield name


@pytest.fixture
def start(
    app: App, pg_url: str, amqp_url: str, exchange: str, schema_name: str, tmp_path: Path
) -> Iterator[Callable[..., ConsumerProcess]]:
    counter = iter(range(100))
    with consumer_processes(
        pg_url=pg_url, amqp_url=amqp_url, exchange=exchange, schema=schema_name,
        group=app.handlers.name, queues=2,
    ) as start:  # fmt: skip

        def start_one(
            env: dict[str, str] | None = None, args: tuple[str, ...] = ()
        ) -> ConsumerProcess:
            return start(log=tmp_path / f"consumer-{next(counter)}.log", env=env, args=args)

        yield start_one


def booked(app: App, engine: sa.Engine) -> list[tuple[str, int]]:
    return [(o, n) for h, o, n in app.applied(engine) if h == "book"]


def test_a_consumer_sigkilled_mid_handler_applies_the_message_exactly_once_after_redelivery(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    start: Callable[..., ConsumerProcess],
) -> None:
    doomed = start(env={"OUTBOX_TEST_KILL_IN_HANDLER": "o1:2"})
    publish(amqp_url, exchange, [order_message("o1", n) for n in (1, 2, 3)])
    assert doomed.wait() == -signal.SIGKILL
    assert booked(app, pg_engine) == [("o1", 1)]  # the killed transaction left nothing
    survivor = start()
    wait_for(lambda: len(booked(app, pg_engine)) == 3, "all applied", logs=survivor.output)
    assert booked(app, pg_engine) == [("o1", 1), ("o1", 2), ("o1", 3)]
    survivor.signal(signal.SIGTERM)
    assert survivor.wait() == 0


def test_sigterm_finishes_the_message_in_hand_acks_it_and_exits_0(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    start: Callable[..., ConsumerProcess],
    tmp_path: Path,
) -> None:
    hold, markers = tmp_path / "hold", tmp_path / "markers"
    hold.touch()
    markers.mkdir()
    consumer = start(
        env={"OUTBOX_TEST_HOLD_FILE": str(hold), "OUTBOX_TEST_MARKER_DIR": str(markers)}
    )
    publish(amqp_url, exchange, [order_message("o1", 1), order_message("o1", 2)])
    wait_for(lambda: (markers / "o1-1").exists(), "handler entered", logs=consumer.output)
    consumer.signal(signal.SIGTERM)
    hold.unlink()
    assert consumer.wait() == 0, consumer.output()
    assert booked(app, pg_engine) == [("o1", 1)]  # the one in hand, not the next
    # It was acked: a new consumer gets only the second message, and no duplicate.
    markers_before = set(markers.iterdir())
    again = start(env={"OUTBOX_TEST_MARKER_DIR": str(markers)})
    wait_for(lambda: len(booked(app, pg_engine)) == 2, "second applied", logs=again.output)
    assert set(markers.iterdir()) - markers_before == {markers / "o1-2"}


def test_two_consumer_processes_keep_per_key_order_through_a_failover(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    start: Callable[..., ConsumerProcess],
    tmp_path: Path,
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    keys = [f"k{i}" for i in range(10)]
    first = start(env={"OUTBOX_TEST_MARKER_DIR": str(markers)})
    publish(amqp_url, exchange, [order_message("warm", 1)])
    wait_for(lambda: (markers / "warm-1").exists(), "first consumer active", logs=first.output)
    standby = start()  # registers second on every queue: single active consumer keeps it idle
    publish(
        amqp_url,
        exchange,
        [order_message(k, n, seq=n * 100 + i) for n in range(1, 21) for i, k in enumerate(keys)],
    )
    wait_for(
        lambda: len(booked(app, pg_engine)) >= 40, "some applied by the first", logs=first.output
    )
    first.process.kill()  # mid-stream: its message in hand goes back to the queue
    assert first.wait() == -signal.SIGKILL
    publish(
        amqp_url,
        exchange,
        [order_message(k, n, seq=n * 100 + i) for n in range(21, 31) for i, k in enumerate(keys)],
    )
    wait_for(
        lambda: len(booked(app, pg_engine)) == 301, "all applied", timeout=60, logs=standby.output
    )
    done = booked(app, pg_engine)
    for key in keys:
        assert [n for k, n in done if k == key] == list(range(1, 31)), key
    assert len(app.pids(pg_engine)) == 2  # both processes applied some: the failover happened
    standby.signal(signal.SIGTERM)
    assert standby.wait() == 0


def test_a_failing_key_parks_while_others_flow_and_inbox_parked_retry_resumes_it_in_order(
    app: App,
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    exchange: str,
    schema_name: str,
    start: Callable[..., ConsumerProcess],
    tmp_path: Path,
) -> None:
    fail = tmp_path / "fail"
    fail.write_text("bad\n")
    consumer = start(env={"OUTBOX_TEST_FAIL_FILE": str(fail)})
    publish(
        amqp_url,
        exchange,
        [
            order_message(k, n, seq=n * 10 + i)
            for n in (1, 2, 3)
            for i, k in enumerate(["bad", "ok"])
        ],
    )
    admin = ParkedAdmin(pg_engine, app.inbox, app.handlers.name)
    wait_for(
        lambda: admin.counts() == (3, 1) and len(booked(app, pg_engine)) == 3,
        "bad parked, ok applied",
        logs=consumer.output,
    )
    assert booked(app, pg_engine) == [("ok", 1), ("ok", 2), ("ok", 3)]
    options = ["--database-url", pg_url, "--consumer", app.handlers.name, "--schema", schema_name]
    listed = CliRunner().invoke(main, ["inbox", "parked", "list", *options])
    assert listed.exit_code == 0, listed.output
    assert "order:bad" in listed.output and "failed" in listed.output and "behind" in listed.output
    assert "RuntimeError: booking order bad failed" in listed.output
    fail.unlink()  # the fix is deployed
    retried = CliRunner().invoke(main, ["inbox", "parked", "retry", "order:bad", "--yes", *options])
    assert retried.exit_code == 0, retried.output
    assert "retry requested for 3 parked messages (1 key)" in retried.output
    wait_for(lambda: admin.counts() == (0, 0), "replayed", logs=consumer.output)
    assert [n for k, n in booked(app, pg_engine) if k == "bad"] == [1, 2, 3]
    publish(amqp_url, exchange, [order_message("bad", 4, seq=99)])
    wait_for(
        lambda: ("bad", 4) in booked(app, pg_engine), "the key flows again", logs=consumer.output
    )


def test_a_consumer_sigkilled_between_commit_and_ack_skips_the_redelivery_as_a_duplicate(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    start: Callable[..., ConsumerProcess],
    tmp_path: Path,
) -> None:
    doomed = start(env={"OUTBOX_TEST_KILL_AFTER_COMMIT": "o1:1"})
    first = order_message("o1", 1)
    publish(amqp_url, exchange, [first, order_message("o1", 2)])
    assert doomed.wait() == -signal.SIGKILL
    assert booked(app, pg_engine) == [("o1", 1)]  # committed, never acked
    markers = tmp_path / "markers"
    markers.mkdir()
    survivor = start(env={"OUTBOX_TEST_MARKER_DIR": str(markers)})
    wait_for(lambda: len(booked(app, pg_engine)) == 2, "second applied", logs=survivor.output)
    assert booked(app, pg_engine) == [("o1", 1), ("o1", 2)]
    # The redelivered o1:1 never reached a handler: it was a duplicate.
    assert sorted(p.name for p in markers.iterdir()) == ["o1-2"]
    assert f"skipped duplicate order.placed message {first.message_id}" in survivor.output()


def test_threads_share_the_queues_keep_key_order_and_stop_on_sigterm(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    start: Callable[..., ConsumerProcess],
) -> None:
    consumer = start(args=("--threads", "2"))
    keys = [f"k{i}" for i in range(10)]
    publish(
        amqp_url,
        exchange,
        [order_message(k, n, seq=n * 100 + i) for n in range(1, 11) for i, k in enumerate(keys)],
    )
    wait_for(lambda: len(booked(app, pg_engine)) == 100, "all applied", logs=consumer.output)
    done = booked(app, pg_engine)
    for key in keys:
        assert [n for k, n in done if k == key] == list(range(1, 11)), key
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0, consumer.output()
    assert "queues " in consumer.output() and "/1: group" in consumer.output()


def test_more_threads_than_queues_is_a_usage_error(pg_url: str, amqp_url: str) -> None:
    result = CliRunner().invoke(
        main,
        ["consume", "tests.consumer.app:handlers", "--database-url", pg_url, "--amqp-url",
         amqp_url, "--queues", "2", "--threads", "3"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--threads (3) must not exceed --queues (2)" in result.output


def test_metrics_are_served_on_the_metrics_port(
    app: App,
    pg_engine: sa.Engine,
    amqp_url: str,
    exchange: str,
    start: Callable[..., ConsumerProcess],
) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    consumer = start(args=("--metrics-port", str(port), "--metrics-address", "127.0.0.1"))
    publish(amqp_url, exchange, [order_message("o1", 1)])
    wait_for(lambda: len(booked(app, pg_engine)) == 1, "applied", logs=consumer.output)

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                return str(page.read().decode())
        except OSError:
            return ""

    line = (
        f'outbox_consumer_messages_total{{consumer="{app.handlers.name}",outcome="handled",'
        'type="order.placed"} 1.0'
    )
    wait_for(lambda: line in scrape(), "the metric", logs=consumer.output)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
