"""Operator commands on the real PostgreSQL (and RabbitMQ, where delivery is the point):
requeued dead letters arrive in their original order per key, bulk repairs work in batches,
and status and metrics read the same numbers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from outbox import Event, Outbox
from relay.admin import Admin
from relay.admin_records import Selector
from relay.cli import main
from relay.prometheus import PrometheusMetrics
from relay.settings import RelaySettings
from relay.store import Store
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import relay_thread, write_events


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def cli(pg_url: str, box: Outbox, *args: str, input: str | None = None) -> Result:
    env = {"OUTBOX_DATABASE_URL": pg_url, "OUTBOX_SCHEMA": box.schema or ""}
    return CliRunner(env=env).invoke(
        main, list(args), input=input, catch_exceptions=False, prog_name="outbox-relay"
    )


def kill(engine: sa.Engine, box: Outbox, *ids: uuid.UUID, error: str = "unroutable") -> None:
    """Make rows dead the way the relay does: attempts spent, a failure recorded."""
    t, k = box.events, box.keys
    with engine.begin() as conn:
        keys = conn.scalars(
            sa.update(t)
            .where(t.c.id.in_(ids))
            .values(status="dead", attempts=2, last_error=error)
            .returning(t.c.key)
        ).all()
        conn.execute(sa.update(k).where(k.c.key.in_(keys)).values(held=True))
        conn.execute(
            sa.insert(box.failures),
            [
                {"event_id": i, "attempt": 2, "failed_at": now(), "relay": "r", "error": error}
                for i in ids
            ],
        )


def statuses(engine: sa.Engine, box: Outbox) -> dict[str, int]:
    t = box.events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status))
        return {status: count for status, count in rows}


def test_requeued_dead_letters_arrive_in_their_original_order_per_key(
    pg_engine: sa.Engine, pg_url: str, amqp_url: str, outbox_schema: Outbox
) -> None:
    # Given: key "k" has two dead rows among five; its other rows wait behind them.
    k = [Event(type=f"order.step{i}", key="k", payload={"i": i}) for i in range(5)]
    other = Event(type="order.placed", key="other")
    write_events(pg_engine, outbox_schema, [*k, other])
    kill(pg_engine, outbox_schema, k[1].id, k[3].id)
    with QueueTap(amqp_url) as tap:
        exchange = tap.declare_exchange(unique_name("ex"))
        tap.bind(exchange, "order.#")
        settings = RelaySettings(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=outbox_schema.schema,
            exchange=exchange,
            name=unique_name("relay"),
            poll_interval=0.2,
        )
        with relay_thread(settings):
            assert [d.message_id for d in tap.drain(expected=1, timeout=5)] == [str(other.id)]
            # "k" is held back: an event written after "other" is claimed and delivered (so
            # the relay claimed again), and still nothing of "k" arrived.
            probe = Event(type="order.probe", key="probe")
            write_events(pg_engine, outbox_schema, [probe])
            arrived = [d.message_id for d in tap.drain(expected=2, timeout=5)]
            assert arrived == [str(other.id), str(probe.id)]
            # When: both are requeued while the relay runs, one row per transaction.
            admin = Admin(pg_engine, outbox_schema, batch_size=1)
            assert admin.requeue(admin.plan(Selector(key="k"))) == 2
            deliveries = tap.drain(expected=7, timeout=10)
    # Then: every event of "k" arrives once, in write order, with its own id.
    k_deliveries = [d for d in deliveries if d.key == "k"]
    assert [d.message_id for d in k_deliveries] == [str(e.id) for e in k]
    assert [d.seq for d in k_deliveries] == sorted(d.seq for d in k_deliveries)
    assert statuses(pg_engine, outbox_schema) == {"published": 7}


def test_status_and_gauges_on_postgres(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox
) -> None:
    events = [Event(type="a", key=key) for key in ("x", "x", "y", "y", "z")]
    write_events(pg_engine, outbox_schema, events)
    kill(pg_engine, outbox_schema, events[0].id)
    t, k = outbox_schema.events, outbox_schema.keys
    with pg_engine.begin() as conn:
        # y's head waits for a retry, z is leased by a relay (as the relay records them).
        conn.execute(
            sa.update(t)
            .where(t.c.id == events[2].id)
            .values(next_attempt_at=now() + dt.timedelta(minutes=1), attempts=1)
        )
        conn.execute(
            sa.update(k).where(k.c.key == "y").values(available_at=now() + dt.timedelta(minutes=1))
        )
    # A relay's lease on "z", taken the relay's way: the other keys are dead or waiting.
    claim = Store(pg_engine, outbox_schema, db_timeout=10).claim(
        owner="r1",
        limit=10,
        run_length=10,
        lease_until=now() + dt.timedelta(minutes=1),
        now=now(),
    )
    assert [e.id for e in claim.events] == [events[4].id]
    status = json.loads(cli(pg_url, outbox_schema, "status", "--json").output)
    assert status["table"] == outbox_schema.qualified_name
    assert (status["pending"], status["in_flight"], status["waiting_retry"]) == (4, 1, 1)
    assert (status["dead"], status["keys_held_back"]) == (1, 2)

    gauges = Admin(pg_engine, outbox_schema).gauges()
    assert (gauges.pending, gauges.dead) == (4, 1)
    metrics = PrometheusMetrics(outbox_gauges=Admin(pg_engine, outbox_schema).gauges)
    assert metrics.registry.get_sample_value("outbox_relay_pending_events") == 4
    age = metrics.registry.get_sample_value("outbox_relay_oldest_pending_age_seconds")
    assert age is not None and 0 <= age < 60


def test_bulk_requeue_and_purge_work_in_batches(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox
) -> None:
    events = [Event(type="invoice.created", key=f"k{i % 50}") for i in range(2500)]
    write_events(pg_engine, outbox_schema, events, per_transaction=2500)
    t = outbox_schema.events
    with pg_engine.begin() as conn:
        conn.execute(sa.update(t).values(status="dead", attempts=3, last_error="nacked"))
    listed = cli(pg_url, outbox_schema, "dead", "list", "--limit", "5")
    assert "showing 5 of 2500 dead letters" in listed.output

    result = cli(pg_url, outbox_schema, "dead", "requeue", "--all", "--yes")
    assert result.exit_code == 0, result.output
    assert "requeued 2500 dead letters (50 keys)" in result.output
    with pg_engine.connect() as conn:
        row = conn.execute(
            sa.select(sa.func.count(), sa.func.max(t.c.attempts)).where(t.c.status == "pending")
        ).one()
    assert tuple(row) == (2500, 0)

    with pg_engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.key == "k7").values(status="dead"))
    purged = cli(pg_url, outbox_schema, "dead", "purge", "--key", "k7", "--yes")
    assert purged.exit_code == 0 and "deleted 50 dead letters (1 key)" in purged.output
    assert statuses(pg_engine, outbox_schema) == {"pending": 2450}


def test_dead_show_and_requeue_by_id_on_postgres(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox
) -> None:
    event = Event(type="invoice.created", key="i1", payload={"total": "9.99"}, headers={"t": "a"})
    write_events(pg_engine, outbox_schema, [event])
    kill(pg_engine, outbox_schema, event.id, error="unroutable: 312 NO_ROUTE")
    shown = json.loads(cli(pg_url, outbox_schema, "dead", "show", str(event.id), "--json").output)
    assert shown["payload"] == {"total": "9.99"} and shown["headers"] == {"t": "a"}
    assert shown["failures"][0]["error"] == "unroutable: 312 NO_ROUTE"
    selected = cli(pg_url, outbox_schema, "dead", "list", "--json", "--since", "1h", "--key", "i1")
    assert [d["id"] for d in json.loads(selected.output)] == [str(event.id)]
    future = (now() + dt.timedelta(minutes=1)).isoformat()
    assert (
        json.loads(cli(pg_url, outbox_schema, "dead", "list", "--json", "--since", future).output)
        == []
    )
    missing = uuid.uuid4()
    refused = cli(pg_url, outbox_schema, "dead", "requeue", str(event.id), str(missing), "--yes")
    assert refused.exit_code == 1 and statuses(pg_engine, outbox_schema) == {"dead": 1}
    done = cli(pg_url, outbox_schema, "dead", "requeue", str(event.id))
    assert done.exit_code == 0 and statuses(pg_engine, outbox_schema) == {"pending": 1}


def test_health_is_ok_on_the_real_services(
    pg_url: str, amqp_url: str, outbox_schema: Outbox
) -> None:
    result = cli(pg_url, outbox_schema, "health", "--amqp-url", amqp_url)
    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.output.splitlines()] == [
        ["database", "ok"],
        ["broker", "ok"],
        ["exchange", "ok"],
    ]


def test_run_until_empty_publishes_and_exits_0(
    pg_engine: sa.Engine, pg_url: str, amqp_url: str, outbox_schema: Outbox
) -> None:
    events = [Event(type="order.placed", key=f"k{i % 3}") for i in range(9)]
    write_events(pg_engine, outbox_schema, events)
    before = signal.getsignal(signal.SIGTERM)
    with QueueTap(amqp_url) as tap:
        exchange = tap.declare_exchange(unique_name("ex"))
        tap.bind(exchange)
        result = cli(
            pg_url,
            outbox_schema,
            "run",
            *("--amqp-url", amqp_url, "--exchange", exchange, "--until-empty"),
            *("--retention", "0", "--name", unique_name("relay")),
        )
        deliveries = tap.drain(expected=9, timeout=5)
    assert result.exit_code == 0, result.output
    assert sorted(d.message_id for d in deliveries) == sorted(str(e.id) for e in events)
    assert statuses(pg_engine, outbox_schema) == {}  # retention 0: deleted once confirmed
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_demo_refuses_a_schema_with_other_tables(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox
) -> None:
    assert outbox_schema.schema is not None
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{outbox_schema.schema}".customers (id int)')
    # The demo reads --database-url (or OUTBOX_DEMO_DATABASE_URL), never OUTBOX_DATABASE_URL.
    demo = ("demo", "--database-url", pg_url, "--schema", outbox_schema.schema)
    result = cli(pg_url, outbox_schema, *demo)
    assert result.exit_code == 2
    assert "holds tables the demo did not create (customers)" in result.stderr
    with pg_engine.connect() as conn:  # nothing was dropped
        assert (
            conn.exec_driver_sql(
                f'SELECT count(*) FROM "{outbox_schema.schema}".customers'
            ).scalar_one()
            == 0
        )


def test_demo_with_an_unreachable_broker_exits_4(pg_url: str, schema_name: str) -> None:
    result = CliRunner(env={"OUTBOX_DEMO_DATABASE_URL": pg_url}).invoke(
        main,
        ["demo", "--schema", schema_name, "--amqp-url", "amqp://guest:pw@127.0.0.1:1/%2F"],
        catch_exceptions=False,
        prog_name="outbox-relay",
    )
    assert result.exit_code == 4
    assert "amqp://guest:***@127.0.0.1:1/%2F (--amqp-url / OUTBOX_AMQP_URL)" in result.stderr
