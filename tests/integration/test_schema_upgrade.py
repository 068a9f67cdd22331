"""Upgrading an outbox of schema 1 (outbox-relay 0.1.0) in place, populated with events in
every state, by `Outbox.create()` / `outbox-relay init-db` and by the SQL of `init-db --sql`."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import Outbox
from outbox.ddl import check
from relay.cli import main
from relay.store import Store
from tests.conftest import PG_URL

V1_DDL = (Path(__file__).parent / "schema_v1.sql").read_text()


def install_v1(engine: sa.Engine, schema: str) -> None:
    body = "\n".join(line for line in V1_DDL.splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in _split(body.replace("schema_v1", schema)):
            conn.exec_driver_sql(statement.replace("%", "%%"))


def _split(script: str) -> list[str]:
    statements, current, in_body = [], [], False
    for line in script.splitlines():
        current.append(line)
        if line.count("$fn$") % 2:
            in_body = not in_body
        if not in_body and line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";"))
            current = []
    return [s for s in statements if s]


def populate_v1(engine: sa.Engine, schema: str, start: dt.datetime) -> dict[str, list[int]]:
    """Rows as a schema-1 relay leaves them: pending, leased, retrying, dead, published."""
    later = start + dt.timedelta(minutes=10)
    table = f'"{schema}".outbox'
    rows = [
        ("a", {}),
        ("a", {}),
        ("leased", {"claim_token": str(uuid.uuid4()), "lease_until": later}),
        ("leased", {}),
        ("retry", {"attempts": 1, "next_attempt_at": later}),
        ("retry", {}),
        ("dead", {"status": "dead", "attempts": 10}),
        ("dead", {}),
        ("done", {"status": "published", "published_at": start}),
        (None, {}),
        (None, {"claim_token": str(uuid.uuid4()), "lease_until": later}),
    ]
    seqs: dict[str, list[int]] = {}
    with engine.begin() as conn:
        for key, extra in rows:
            seq = conn.exec_driver_sql(
                f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at) "
                "VALUES (%(id)s, 't', %(key)s, 't', '{}', now()) RETURNING seq",
                {"id": uuid.uuid4(), "key": key},
            ).scalar_one()
            seqs.setdefault(key or "", []).append(seq)
            if extra:
                sets = ", ".join(f"{column} = %({column})s" for column in extra)
                conn.exec_driver_sql(
                    f"UPDATE {table} SET {sets} WHERE seq = %(seq)s", {**extra, "seq": seq}
                )
    return seqs


@pytest.fixture
def v1_schema(pg_engine: sa.Engine) -> Iterator[str]:
    name = f"v1_{uuid.uuid4().hex[:10]}"
    install_v1(pg_engine, name)
    yield name
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def keys(engine: sa.Engine, box: Outbox, start: dt.datetime) -> dict[str, tuple[bool, bool, bool]]:
    """key -> (held, waiting until later, ready now)."""
    k = box.keys
    with engine.connect() as conn:
        rows = conn.execute(sa.select(k)).all()
    moment = dt.datetime.now(dt.UTC)
    return {
        row.key: (
            row.held,
            row.available_at > start + dt.timedelta(minutes=5),
            row.available_at <= moment,
        )
        for row in rows
    }


def assert_upgraded(
    engine: sa.Engine, box: Outbox, seqs: dict[str, list[int]], start: dt.datetime
) -> None:
    with engine.connect() as conn:
        result = check(box, conn)
    assert result.ok, result.errors
    assert keys(engine, box, start) == {
        "a": (False, False, True),
        "leased": (False, True, False),  # its old lease still counts
        "retry": (False, True, False),  # waits for its retry time
        "dead": (True, False, True),  # held by its dead head, as schema 1 did by default
    }
    # A schema-1 relay leasing a keyed row is refused with a name that says why.
    with pytest.raises(sa.exc.IntegrityError, match="outbox_lease_v2"), engine.begin() as conn:
        t = box.events
        conn.execute(sa.update(t).where(t.c.seq == seqs["a"][0]).values(claim_token=uuid.uuid4()))
    # Claims now: key a in order, the free keyless row; later the leased and retrying keys.
    store = Store(engine, box, db_timeout=10)
    first = store.claim(
        owner="new",
        limit=100,
        run_length=10,
        lease_until=start + dt.timedelta(hours=2),
        now=dt.datetime.now(dt.UTC),
    )
    assert sorted((e.key or "", e.seq) for e in first.events) == [
        ("", seqs[""][0]),
        *(("a", s) for s in seqs["a"]),
    ]
    much_later = start + dt.timedelta(hours=1)
    second = store.claim(
        owner="new", limit=100, run_length=10, lease_until=much_later, now=much_later
    )
    got: dict[str | None, list[int]] = {}
    for event in second.events:
        got.setdefault(event.key, []).append(event.seq)
    assert got == {"leased": seqs["leased"], "retry": seqs["retry"], None: [seqs[""][1]]}


def test_create_upgrades_a_populated_schema_1_outbox_in_place(
    pg_engine: sa.Engine, v1_schema: str
) -> None:
    start = dt.datetime.now(dt.UTC)
    seqs = populate_v1(pg_engine, v1_schema, start)
    box = Outbox(schema=v1_schema)
    with pg_engine.connect() as conn:
        before = check(box, conn)
    assert not before.ok and "earlier version" in before.errors[0]
    report = box.create(pg_engine)
    assert any("upgraded" in change and "4 keys" in change for change in report.changes)
    assert_upgraded(pg_engine, box, seqs, start)
    assert box.create(pg_engine).changes == ("nothing to do: the outbox is complete",)


def test_the_sql_of_init_db_upgrades_in_place_too(pg_engine: sa.Engine, v1_schema: str) -> None:
    start = dt.datetime.now(dt.UTC)
    seqs = populate_v1(pg_engine, v1_schema, start)
    box = Outbox(schema=v1_schema)
    with pg_engine.begin() as conn:
        for statement in box.ddl_statements():
            conn.exec_driver_sql(statement)
    assert_upgraded(pg_engine, box, seqs, start)


def test_init_db_says_what_it_changed_and_run_refuses_an_old_schema(
    pg_engine: sa.Engine, v1_schema: str
) -> None:
    populate_v1(pg_engine, v1_schema, dt.datetime.now(dt.UTC))
    runner = CliRunner()
    url = ["--database-url", PG_URL, "--schema", v1_schema]
    health = runner.invoke(main, ["health", *url, "--amqp-url", "amqp://guest:guest@127.0.0.1/"])
    assert health.exit_code == 5 and "earlier version" in health.output
    result = runner.invoke(main, ["init-db", *url])
    assert result.exit_code == 0, result.output
    assert "upgraded" in result.output and "held by a dead letter" in result.output
