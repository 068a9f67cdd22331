"""The inbox and the processor on a real PostgreSQL: once, in key order, parked on failure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from outbox.consumer import InboxUnavailableError, Message, Outcome, Processor, RetryPolicy
from tests.consumer.app import App, build
from tests.consumer.support import order_message, terminate_handler_session


@pytest.fixture
def app(pg_engine: sa.Engine, schema_name: str) -> App:
    app = build(schema_name)
    app.create(pg_engine)
    return app


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def processor(app: App, pg_engine: sa.Engine, sleeps: Sleeps) -> Processor:
    return Processor(
        app.handlers,
        sessionmaker(pg_engine),
        policy=RetryPolicy(max_attempts=3, retry_min=0.1, retry_max=0.15),
        sleep=sleeps,
    )


def parked_rows(app: App, engine: sa.Engine) -> list[tuple[str, int | None, str]]:
    p = app.inbox.parked
    with engine.connect() as conn:
        rows = conn.execute(sa.select(p.c.key, p.c.seq, p.c.reason).order_by(p.c.id)).all()
    return [(r.key, r.seq, r.reason) for r in rows]


def test_a_message_delivered_twice_applies_once(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    message = order_message("1", 1)
    assert processor.process(message).outcome is Outcome.HANDLED
    assert processor.process(message).outcome is Outcome.DUPLICATE
    assert app.applied(pg_engine) == [("book", "1", 1), ("notify", "1", 1)]


def test_two_consumer_groups_apply_the_same_message_independently(
    pg_engine: sa.Engine, schema_name: str
) -> None:
    billing = build(schema_name, name="billing")
    billing.create(pg_engine)
    stock = build(schema_name, name="stock")
    message = order_message("1", 1)
    for group in (billing, stock):
        result = Processor(group.handlers, sessionmaker(pg_engine)).process(message)
        assert result.outcome is Outcome.HANDLED
    assert len(billing.applied(pg_engine)) == 4


def test_a_concurrent_duplicate_waits_for_the_first_and_is_skipped(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    """Interleaving: the duplicate's INSERT runs while the first transaction is still open."""
    message = order_message("1", 1)
    second: list[Outcome] = []
    blocked = threading.Event()

    def duplicate() -> None:
        other = Processor(app.handlers, sessionmaker(pg_engine))
        second.append(other.process(message).outcome)

    def inside(event: object) -> None:
        if blocked.is_set():
            return
        blocked.set()
        thread.start()
        wait_for_lock_waiter(
            pg_engine, app.inbox.schema or ""
        )  # the duplicate now waits on our inbox row

    thread = threading.Thread(target=duplicate)
    app.faults.inside_handler = inside
    assert processor.process(message).outcome is Outcome.HANDLED
    thread.join(timeout=10)
    assert second == [Outcome.DUPLICATE]
    assert app.applied(pg_engine) == [("book", "1", 1), ("notify", "1", 1)]


def wait_for_lock_waiter(engine: sa.Engine, schema: str, timeout: float = 10.0) -> None:
    """Until a session waits on a lock in a statement on this test's schema."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND position(:schema in query) > 0"
                ),
                {"schema": schema},
            ).scalar_one()
            if waiting:
                return
            conn.rollback()
            time.sleep(0.01)
    raise AssertionError("the other transaction never waited on this one's lock")


def test_rollback_leaves_no_inbox_row_so_the_redelivery_applies(
    app: App, processor: Processor, pg_engine: sa.Engine, sleeps: Sleeps
) -> None:
    app.faults.fail_times["1"] = 1
    assert processor.process(order_message("1", 1)).outcome is Outcome.HANDLED
    assert sleeps == [0.1]
    # The failed attempt's effects rolled back with its inbox row.
    assert app.applied(pg_engine) == [("book", "1", 1), ("notify", "1", 1)]


def test_an_older_seq_after_a_newer_one_is_parked_as_stale_without_holding_the_key(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    assert processor.process(order_message("1", 2, seq=20)).outcome is Outcome.HANDLED
    assert processor.process(order_message("1", 1, seq=10)).outcome is Outcome.STALE
    assert processor.process(order_message("1", 3, seq=30)).outcome is Outcome.HANDLED
    assert [e for e in app.applied(pg_engine) if e[0] == "book"] == [
        ("book", "1", 2),
        ("book", "1", 3),
    ]
    assert parked_rows(app, pg_engine) == [("order:1", 10, "stale")]


def test_failing_handler_retries_then_parks_its_key_while_others_flow_and_retry_resumes_in_order(
    app: App, processor: Processor, pg_engine: sa.Engine, sleeps: Sleeps
) -> None:
    assert processor.process(order_message("bad", 1, seq=1)).outcome is Outcome.HANDLED
    app.faults.fail_times["bad"] = 10**6
    result = processor.process(order_message("bad", 2, seq=2))
    assert (result.outcome, result.attempts, result.reason) == (Outcome.PARKED, 3, "failed")
    assert "booking order bad failed" in (result.error or "")
    assert sleeps == [0.1, 0.15]  # doubling, capped
    behind = processor.process(order_message("bad", 3, seq=3))
    assert (behind.outcome, behind.reason) == (Outcome.PARKED, "behind")
    assert processor.process(order_message("good", 1, seq=4)).outcome is Outcome.HANDLED
    assert parked_rows(app, pg_engine) == [("order:bad", 2, "failed"), ("order:bad", 3, "behind")]

    # No retry was asked for: nothing is replayed.
    assert processor.retry_requested() == 0
    app.faults.fail_times["bad"] = 0
    with pg_engine.begin() as conn:
        assert processor.statements.request_retry(conn, key="order:bad") == 2
    assert processor.retry_requested() == 2
    assert parked_rows(app, pg_engine) == []
    assert processor.process(order_message("bad", 4, seq=5)).outcome is Outcome.HANDLED
    booked = [(o, n) for h, o, n in app.applied(pg_engine) if h == "book"]
    assert booked == [("bad", 1), ("good", 1), ("bad", 2), ("bad", 3), ("bad", 4)]


def test_a_replay_that_fails_again_keeps_the_key_parked_with_the_new_error(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    app.faults.fail_times["bad"] = 10**6
    processor.process(order_message("bad", 1))
    processor.process(order_message("bad", 2))
    with pg_engine.begin() as conn:
        processor.statements.request_retry(conn, key="order:bad")
    assert processor.retry_requested() == 0
    with pg_engine.connect() as conn:
        rows = processor.statements.parked(conn)
    assert [(r.reason, r.attempts, r.retry_requested) for r in rows] == [
        ("failed", 6, False),
        ("behind", 0, False),
    ]
    assert processor.process(order_message("bad", 3)).reason == "behind"
    assert app.applied(pg_engine) == []


def test_v1_and_v2_payloads_are_upcast_to_v3(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    seen: list[object] = []
    app.faults.inside_handler = seen.append
    for version in (1, 2, 3):
        assert processor.process(order_message("1", version, version=version)).outcome is (
            Outcome.HANDLED
        )
    cls = app.order_placed
    import decimal

    assert seen == [cls("1", n, decimal.Decimal("9.99"), "EUR") for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (order_message("1", 1, version=4), "version 4 is newer than OrderPlaced"),
        (order_message("1", 1, body=b"{not json"), "is not JSON"),
        (order_message("1", 1, payload={"order_id": "1", "n": "x"}), "expected an integer"),
        (
            Message.from_delivery(
                message_id=None,
                type="order.placed",
                headers={"ordering-key": "order:1"},
                body=b"{}",
            ),
            "no message_id",
        ),
    ],
    ids=["unknown-version", "not-json", "wrong-field", "no-message-id"],
)
def test_undecodable_messages_are_parked_with_what_to_fix(
    app: App,
    processor: Processor,
    pg_engine: sa.Engine,
    sleeps: Sleeps,
    message: Message,
    error: str,
) -> None:
    result = processor.process(message)
    assert (result.outcome, result.reason) == (Outcome.PARKED, "undecodable")
    assert error in (result.error or "")
    assert sleeps == []  # never retried: it would fail the same way
    with pg_engine.connect() as conn:
        [row] = processor.statements.parked(conn)
    assert row.error == result.error and row.message.body == message.body
    assert app.applied(pg_engine) == []


def test_an_untyped_handler_gets_the_message_and_unsubscribed_types_are_recorded(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    archived = order_message("1", 5, type="order.archived", payload={"order_id": "1", "n": 5})
    assert processor.process(archived).outcome is Outcome.HANDLED
    other = order_message("1", 6, type="order.unknown", seq=6)
    assert processor.process(other).outcome is Outcome.IGNORED
    assert processor.process(other).outcome is Outcome.DUPLICATE
    assert app.applied(pg_engine) == [("archive", "1", 5)]


def test_a_lost_database_connection_is_not_parked(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    def kill_own_session(event: object) -> None:
        assert terminate_handler_session(pg_engine, app.inbox.schema) == 1

    app.faults.inside_handler = kill_own_session
    with pg_engine.connect() as poller:  # as a test polling the effects would be, mid-poll
        poller.execute(sa.select(app.effects.c.id)).all()
        with pytest.raises(InboxUnavailableError, match="database connection failed"):
            processor.process(order_message("1", 1))
        assert poller.execute(sa.select(sa.func.count()).select_from(app.effects)).scalar() == 0
    app.faults.inside_handler = None
    assert parked_rows(app, pg_engine) == []
    assert processor.process(order_message("1", 2)).outcome is Outcome.HANDLED


def test_cleanup_deletes_old_rows_in_bounded_batches(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
    m = app.inbox.messages
    with pg_engine.begin() as conn:
        conn.execute(
            sa.insert(m),
            [
                {"consumer": "test", "message_id": str(uuid.uuid4()), "received_at": old}
                for _ in range(2500)
            ],
        )
        conn.execute(
            sa.insert(m),
            [{"consumer": "other", "message_id": "keep-other-group", "received_at": old}],
        )
    processor.process(order_message("1", 1))
    batches: list[int] = []

    @sa.event.listens_for(pg_engine, "after_execute")
    def count(conn: object, clause: object, *args: object) -> None:
        if isinstance(clause, sa.Delete) and clause.table is m:
            batches.append(args[-1].rowcount)  # type: ignore[attr-defined]

    try:
        assert processor.cleanup(batch=1000) == 2500
    finally:
        sa.event.remove(pg_engine, "after_execute", count)
    assert batches == [1000, 1000, 500]
    with pg_engine.connect() as conn:
        left = conn.execute(sa.select(m.c.consumer).order_by(m.c.consumer)).scalars().all()
    assert left == ["other", "test"]  # the recent row, and the other group's


def test_two_consumers_holding_one_key_apply_its_messages_one_at_a_time(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    """A key that moved queues: its next message reaches another consumer while the first
    one is still applying the previous one. The key's row lock makes the second wait, and it
    applies after the first commits (seq 2 after seq 1)."""
    results: list[Outcome] = []
    started = threading.Event()

    def second_consumer() -> None:
        other = Processor(app.handlers, sessionmaker(pg_engine))
        results.append(other.process(order_message("1", 2, seq=2)).outcome)

    def inside(event: object) -> None:
        if started.is_set():
            return
        started.set()
        thread.start()
        wait_for_lock_waiter(pg_engine, app.inbox.schema or "")

    thread = threading.Thread(target=second_consumer)
    app.faults.inside_handler = inside
    assert processor.process(order_message("1", 1, seq=1)).outcome is Outcome.HANDLED
    thread.join(timeout=10)
    assert results == [Outcome.HANDLED]
    assert [n for h, _, n in app.applied(pg_engine) if h == "book"] == [1, 2]


def test_a_message_without_a_key_parks_alone(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    app.faults.fail_times["x"] = 10**6
    keyless = dataclasses.replace(order_message("x", 1), key=None, seq=None, headers={})
    assert processor.process(keyless).outcome is Outcome.PARKED
    app.faults.fail_times["x"] = 0
    again = dataclasses.replace(order_message("x", 2), key=None, seq=None, headers={})
    assert processor.process(again).outcome is Outcome.HANDLED  # nothing holds it back
    assert parked_rows(app, pg_engine) == [(None, None, "failed")]
    with pg_engine.begin() as conn:
        [row] = processor.statements.parked(conn)
        processor.statements.request_retry(conn, ids=[row.id])
    assert processor.retry_requested() == 1
    assert [n for h, _, n in app.applied(pg_engine) if h == "book"] == [2, 1]


def test_messages_without_a_message_id_are_each_parked(
    app: App, processor: Processor, pg_engine: sa.Engine
) -> None:
    for n in (1, 2):
        message = Message.from_delivery(
            message_id=None, type="order.placed", headers={}, body=b'{"n": %d}' % n
        )
        assert processor.process(message).reason == "undecodable"
    with pg_engine.connect() as conn:
        rows = processor.statements.parked(conn)
    assert [r.message.body for r in rows] == [b'{"n": 1}', b'{"n": 2}']


def test_long_keys_caller_chosen_ids_and_names_that_need_quoting(
    pg_engine: sa.Engine, schema_name: str
) -> None:
    from outbox.consumer import Handlers, Inbox
    from outbox.consumer.admin import ParkedAdmin

    schema = f'{schema_name}"Odd Schema'
    inbox = Inbox(schema=schema, prefix="In Box")
    handlers = Handlers("grp", inbox=inbox)
    seen: list[str] = []

    @handlers.on("thing.done")
    def done(message: Message, session: object) -> None:
        seen.append(message.message_id)

    inbox.create(pg_engine)
    try:
        processor = Processor(
            handlers, sessionmaker(pg_engine), policy=RetryPolicy(1), sleep=lambda s: None
        )
        key = "k" * 255
        first = Message(message_id="order-1/placed", type="thing.done", key=key, seq=1, body=b"{}")
        assert processor.process(first).outcome is Outcome.HANDLED
        assert processor.process(first).outcome is Outcome.DUPLICATE
        long_id = "i" * 255
        second = Message(message_id=long_id, type="thing.done", key=key, seq=2, body=b"{}")
        assert processor.process(second).outcome is Outcome.HANDLED
        assert seen == ["order-1/placed", long_id]
        assert processor.cleanup() == 0
        assert ParkedAdmin(pg_engine, inbox, "grp").parked() == []
    finally:
        with pg_engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))


def test_cleanup_and_retries_on_empty_tables_do_nothing(processor: Processor) -> None:
    assert processor.cleanup() == 0
    assert processor.retry_requested() == 0
    assert processor.parked_counts() == (0, 0)
