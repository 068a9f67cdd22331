"""A database must hold a complete outbox: the relay, `health` and `status` say what is missing
(tables made by `metadata.create_all` lack the triggers; a cached sequence breaks ordering),
and `init-db` fixes it, whatever the table and schema are called."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import Event, Outbox
from relay.cli import main
from relay.errors import SchemaMissingError
from relay.store import Store
from tests.conftest import AMQP_URL, PG_URL
from tests.support.relays import write_events


def claimed_keys(store: Store) -> list[str | None]:
    moment = dt.datetime.now(dt.UTC)
    got = store.claim(
        owner="t",
        limit=10,
        run_length=10,
        lease_until=moment + dt.timedelta(seconds=30),
        now=moment,
    )
    return [e.key for e in got.events]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), prog_name="outbox-relay")
    return result.exit_code, result.output


@pytest.fixture
def bare_schema(pg_engine: sa.Engine) -> Iterator[str]:
    name = f"Bare_{uuid.uuid4().hex[:8]}"  # mixed case: must be quoted everywhere
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    yield name
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_tables_made_by_create_all_are_refused_until_init_db_adds_the_triggers(
    pg_engine: sa.Engine, bare_schema: str
) -> None:
    metadata = sa.MetaData()
    box = Outbox(metadata, schema=bare_schema)
    metadata.create_all(pg_engine)  # what an application's create_all or autogenerate does
    write_events(pg_engine, box, [Event(type="t", key="early") for _ in range(2)])
    with pytest.raises(SchemaMissingError, match="no trigger outbox_number_by_key.*init-db"):
        Store(pg_engine, box, db_timeout=10).check()
    db = ["--database-url", PG_URL, "--schema", bare_schema]
    code, output = cli("health", *db, "--amqp-url", AMQP_URL)
    assert code == 5 and "outbox-relay init-db" in output
    code, output = cli("status", *db, "--json")
    assert code == 0
    assert any("no trigger" in p for p in json.loads(output)["schema_problems"])
    code, output = cli("init-db", *db)
    assert code == 0 and "fixed: " in output
    store = Store(pg_engine, box, db_timeout=10)
    store.check()
    code, output = cli("health", *db, "--amqp-url", AMQP_URL)
    assert code == 0, output
    # The events written before the triggers existed are claimed, not stranded.
    assert claimed_keys(store) == ["early", "early"]


def test_a_cached_sequence_is_reported_and_init_db_uncaches_it(
    pg_engine: sa.Engine, bare_schema: str
) -> None:
    box = Outbox(schema=bare_schema)
    box.create(pg_engine)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'ALTER SEQUENCE "{bare_schema}".outbox_seq_seq CACHE 20')
    db = ["--database-url", PG_URL, "--schema", bare_schema]
    code, output = cli("health", *db, "--amqp-url", AMQP_URL)
    assert code == 0 and "caches 20 numbers" in output
    code, output = cli("init-db", *db)
    assert code == 0 and "fixed: " in output and "caches 20" in output
    code, output = cli("health", *db, "--amqp-url", AMQP_URL)
    assert "caches" not in output


@pytest.mark.parametrize("table", ["Events", "order", "select_"])
def test_init_db_accepts_every_name_the_writer_accepts(
    pg_engine: sa.Engine, bare_schema: str, table: str
) -> None:
    code, output = cli(
        "init-db", "--database-url", PG_URL, "--schema", bare_schema, "--table", table
    )
    assert code == 0, output
    box = Outbox(table=table, schema=bare_schema)
    write_events(pg_engine, box, [Event(type="t", key="k") for _ in range(3)])
    store = Store(pg_engine, box, db_timeout=10)
    store.check()
    assert claimed_keys(store) == ["k", "k", "k"]


def test_sqlite_tables_made_by_create_all_are_refused_too(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    metadata = sa.MetaData()
    box = Outbox(metadata)
    metadata.create_all(engine)
    with pytest.raises(SchemaMissingError, match="outbox_track_key"):
        Store(engine, box, db_timeout=10).check()
    box.create(engine)
    Store(engine, box, db_timeout=10).check()
    engine.dispose()


def test_an_outbox_on_the_search_path_numbers_and_tracks_its_keys(
    pg_url: str, bare_schema: str
) -> None:
    """No schema given: the tables live in the first schema of the search path. The trigger
    runs with a fixed search path of its own, so it must name its sequence and key table in
    full."""
    engine = sa.create_engine(pg_url, connect_args={"options": f'-c search_path="{bare_schema}"'})
    try:
        box = Outbox()
        box.create(engine)
        write_events(engine, box, [Event(type="t", key="k") for _ in range(2)])
        store = Store(engine, box, db_timeout=10)
        store.check()
        assert claimed_keys(store) == ["k", "k"]
    finally:
        engine.dispose()
