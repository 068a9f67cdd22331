"""The metrics' gauges read small indexes only: 24 h of published rows kept for retention are
never scanned every 15 s."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from outbox import Event, Outbox
from relay.admin import Admin
from tests.support.relays import write_events


def test_gauges_never_scan_the_published_rows(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    with pg_engine.begin() as conn:  # a day of published rows kept for retention
        conn.exec_driver_sql(
            f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at, status, "
            "published_at) SELECT gen_random_uuid(), 't', 'k' || (g %% 20), 't', '{}', now(), "
            "'published', now() FROM generate_series(1, 50000) AS g"
        )
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i % 20}") for i in range(200)])
    t = outbox_schema.events
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {table}")
        pending = conn.execute(
            sa.select(sa.func.count()).where(t.c.status == "pending")
        ).scalar_one()
    assert pending == 200
    statements: list[tuple[str, object]] = []

    def record(
        conn: object, cursor: object, statement: str, parameters: object, *args: object
    ) -> None:
        statements.append((statement, parameters))

    sa.event.listen(pg_engine, "before_cursor_execute", record)
    try:
        gauges = Admin(pg_engine, outbox_schema).gauges()
    finally:
        sa.event.remove(pg_engine, "before_cursor_execute", record)
    assert gauges.pending == pending and gauges.dead == 0
    assert gauges.held_keys == 0 and gauges.active_relays == 0
    assert gauges.oldest_pending_age is not None
    reads = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    assert reads
    with pg_engine.connect() as conn:
        for statement, parameters in reads:
            explained = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)  # type: ignore[arg-type]
            plan = "\n".join(row[0] for row in explained)
            assert f"Seq Scan on {outbox_schema.name} " not in plan + " ", plan


def test_the_oldest_pending_age_is_the_oldest_of_the_keys_heads(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Writers may set occurred_at: the oldest pending event is not always the first
    written. Key a's head comes first but is younger than key b's head; b's second event is
    older still, but behind its head."""
    now = dt.datetime.now(dt.UTC)
    write_events(
        pg_engine,
        outbox_schema,
        [
            Event(type="t", key="a", occurred_at=now - dt.timedelta(seconds=10)),
            Event(type="t", key="b", occurred_at=now - dt.timedelta(seconds=60)),
            Event(type="t", key="b", occurred_at=now - dt.timedelta(seconds=300)),
        ],
    )
    gauges = Admin(pg_engine, outbox_schema).gauges(now=now)
    assert gauges.oldest_pending_age is not None
    assert abs(gauges.oldest_pending_age - 60) < 1
