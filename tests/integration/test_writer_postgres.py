"""The writer on a real PostgreSQL: events live and die with the caller's transaction."""

from __future__ import annotations

import datetime as dt
import decimal
import threading
import uuid
from dataclasses import dataclass

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import Event, Outbox


def _rows(engine: sa.Engine, box: Outbox) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(box.events).order_by(box.events.c.seq)))


@dataclass(frozen=True)
class Money:
    amount: decimal.Decimal
    currency: str


def test_committed_events_are_visible_from_another_connection(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    # Given an application transaction that writes two events
    placed_at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with Session(pg_engine) as session, session.begin():
        ids = outbox.write(
            session,
            Event(
                type="order.placed",
                payload={"total": Money(decimal.Decimal("9.99"), "EUR"), "at": placed_at},
                aggregate_type="order",
                aggregate_id=42,
                headers={"tenant": "acme"},
                correlation_id="req-1",
                version=2,
            ),
            Event(type="order.paid", payload=None, key="order:42"),
            outbox=outbox_schema,
        )
    # Then another connection sees both, in write order, with every field
    rows = _rows(pg_engine, outbox_schema)
    assert [r.id for r in rows] == ids
    first = rows[0]
    assert first.type == "order.placed"
    assert first.key == "order:42"
    assert first.routing_key == "order.placed"
    assert first.payload == (
        '{"total":{"amount":"9.99","currency":"EUR"},"at":"2026-01-02T03:04:05+00:00"}'
    )
    assert first.headers == '{"tenant":"acme"}'
    assert first.correlation_id == "req-1"
    assert first.version == 2
    assert first.status == "pending"
    assert first.attempts == 0
    assert rows[1].payload == "null"
    assert rows[0].seq < rows[1].seq


def test_rolled_back_events_never_exist(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    with Session(pg_engine) as session:
        outbox.write(session, Event(type="order.placed"), outbox=outbox_schema)
        session.rollback()
    assert _rows(pg_engine, outbox_schema) == []


def test_write_on_a_connection_uses_its_transaction(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with pg_engine.connect() as conn:
        outbox.write(conn, Event(type="a.b"), outbox=outbox_schema)
        assert _rows(pg_engine, outbox_schema) == []  # not committed yet: invisible
        conn.commit()
    assert len(_rows(pg_engine, outbox_schema)) == 1


def test_write_never_commits(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    with pg_engine.connect() as conn:
        outbox.write(conn, Event(type="a.b"), outbox=outbox_schema)
        assert conn.in_transaction()
        conn.rollback()
    assert _rows(pg_engine, outbox_schema) == []


def test_late_commit_of_an_earlier_row_is_numbered_before_a_later_one(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """The trigger makes writers of one key queue, so seq follows commit order per key."""
    first = pg_engine.connect()
    second_done = threading.Event()
    second_ids: list[uuid.UUID] = []

    def second_writer() -> None:
        with pg_engine.begin() as conn:
            second_ids.extend(outbox.write(conn, Event(type="x.y", key="k"), outbox=outbox_schema))
        second_done.set()

    try:
        # T1 writes key k and stays open; T2 writes key k and would commit first.
        first_ids = outbox.write(first, Event(type="x.y", key="k"), outbox=outbox_schema)
        thread = threading.Thread(target=second_writer)
        thread.start()
        # T2 waits for T1 (same key): it cannot commit a row that would overtake T1's.
        assert not second_done.wait(0.5)
        # A writer of another key, or of no key, is not held up.
        with pg_engine.begin() as conn:
            outbox.write(
                conn, Event(type="x.y", key="other"), Event(type="x.y"), outbox=outbox_schema
            )
        first.commit()
        thread.join(5)
        assert second_done.is_set()
    finally:
        first.close()
    by_id = {r.id: r.seq for r in _rows(pg_engine, outbox_schema)}
    assert by_id[first_ids[0]] < by_id[second_ids[0]]


def test_commit_notifies_listeners_and_rollback_does_not(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    dsn = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f'LISTEN "{outbox_schema.channel}"')
        with pg_engine.connect() as conn:
            outbox.write(conn, Event(type="a.b"), outbox=outbox_schema)
            conn.rollback()
        assert list(listener.notifies(timeout=0.3, stop_after=1)) == []
        with pg_engine.begin() as conn:
            outbox.write(conn, Event(type="a.b"), outbox=outbox_schema)
        notes = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in notes] == [outbox_schema.channel]


def test_raw_sql_inserts_get_defaults_and_ordering(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {outbox_schema.qualified_name} "
            "(id, type, key, routing_key, payload, occurred_at) "
            f"VALUES ('{uuid.uuid4()}', 't', 'k', 't', '{{}}', now())"
        )
    (row,) = _rows(pg_engine, outbox_schema)
    assert row.status == "pending" and row.attempts == 0 and row.seq > 0


def test_create_is_idempotent_and_ddl_applies_cleanly(
    pg_engine: sa.Engine, schema_name: str
) -> None:
    box = Outbox(schema=schema_name, table="events")
    box.create(pg_engine)
    box.create(pg_engine)
    with pg_engine.begin() as conn:
        for statement in box.ddl_statements():
            conn.exec_driver_sql(statement)
        outbox.write(conn, Event(type="a.b", key="k"), outbox=box)
    assert len(_rows(pg_engine, box)) == 1


@pytest.mark.parametrize(
    ("make_event", "message"),
    [
        (lambda: Event(type="order.placed", payload={"x": object()}), "cannot be encoded"),
        (lambda: Event(type="order.placed", payload=float("nan")), "cannot be encoded"),
        (
            lambda: Event(type="order.placed", payload={"at": dt.datetime(2026, 1, 1)}),
            "naive datetime",
        ),
    ],
)
def test_unserialisable_payload_raises_and_leaves_no_row(
    pg_engine: sa.Engine, outbox_schema: Outbox, make_event: object, message: str
) -> None:
    with Session(pg_engine) as session:
        good = Event(type="order.placed")
        with pytest.raises(outbox.PayloadNotSerializableError, match=message):
            outbox.write(session, good, make_event(), outbox=outbox_schema)  # type: ignore[operator]
        # The session is still usable and its transaction intact.
        outbox.write(session, Event(type="still.works"), outbox=outbox_schema)
        session.commit()
    assert [r.type for r in _rows(pg_engine, outbox_schema)] == ["still.works"]


def test_closed_connection_is_refused(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    conn = pg_engine.connect()
    conn.close()
    with pytest.raises(outbox.ClosedBindError, match="closed connection"):
        outbox.write(conn, Event(type="a.b"), outbox=outbox_schema)


def test_unsupported_bind_is_refused(outbox_schema: Outbox) -> None:
    with pytest.raises(outbox.UnsupportedBindError, match="Session or Connection"):
        outbox.write("postgresql://", Event(type="a.b"), outbox=outbox_schema)  # type: ignore[arg-type]


def test_non_event_is_refused(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    with Session(pg_engine) as session, pytest.raises(outbox.InvalidEventError, match="Event"):
        outbox.write(session, {"type": "a.b"}, outbox=outbox_schema)  # type: ignore[arg-type]
    assert _rows(pg_engine, outbox_schema) == []
