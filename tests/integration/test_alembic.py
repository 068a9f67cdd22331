"""Alembic migrations carry all of the outbox's DDL: a real `alembic upgrade` and `downgrade`
on PostgreSQL and SQLite, set up as the README says, leave an outbox the relay runs on, and
then nothing of it; autogenerate writes `op.create_outbox()`, never `create_table` for it."""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata, produce_migrations, render_python_code
from alembic.operations import ops
from alembic.runtime.migration import MigrationContext

import outbox
from outbox import Event, Outbox
from outbox.alembic import CreateOutboxOp, OutboxMigrationError, UpgradeOutboxOp, include_object
from outbox.ddl import check
from relay.settings import RelaySettings
from tests.conftest import PG_ADMIN_DSN
from tests.integration.test_schema_upgrade import assert_upgraded, install_v1, populate_v1
from tests.support.alembic_project import AlembicProject, readme_blocks
from tests.support.history import check_history
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import relay_thread, written

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A database of its own: the migration's alembic_version table lives there too."""
    name = f"alembic_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def leftovers(engine: sa.Engine, schema: str | None) -> list[str]:
    """Every object in the schema but alembic's own: tables, indexes, sequences, functions,
    triggers (PostgreSQL); tables, indexes, triggers, autoincrement counters (SQLite)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(
                "SELECT type || ' ' || name FROM sqlite_master "
                "WHERE tbl_name <> 'alembic_version' AND name <> 'sqlite_sequence' "
                "UNION ALL SELECT 'counter ' || name FROM sqlite_sequence"
            )
            return sorted(rows.scalars())
        namespace = {"schema": schema or "public"}
        relations = conn.execute(
            sa.text(
                "SELECT c.relkind::text || ' ' || c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :schema "
                "AND c.relname NOT LIKE 'alembic_version%'"
            ),
            namespace,
        ).scalars()
        functions = conn.execute(
            sa.text(
                "SELECT 'function ' || p.proname FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :schema"
            ),
            namespace,
        ).scalars()
        triggers = conn.exec_driver_sql(
            "SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal"
        ).scalars()
        return sorted([*relations, *functions, *triggers])


def first_migration(table: str, schema: str | None) -> str:
    """The README's first migration, given the outbox's names as the README says to."""
    code = readme_blocks()["first"].code
    if (table, schema) == ("outbox", None):
        return code
    assert code.count("op.create_outbox()") == 1 and code.count("op.drop_outbox()") == 1
    names = f"table={table!r}, schema={schema!r}"
    return code.replace("op.create_outbox()", f"op.create_outbox({names})").replace(
        "op.drop_outbox()", f"op.drop_outbox({names})"
    )


def assert_relay_publishes(
    url: str, amqp_url: str, box: Outbox, tap: QueueTap, exchange: str
) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            outbox.write(
                conn,
                *(
                    Event(type="order.placed", key=f"order:{i % 2}", payload={"i": i})
                    for i in range(4)
                ),
                outbox=box,
            )
        settings = RelaySettings(
            database_url=url,
            amqp_url=amqp_url,
            table=box.name,
            schema=box.schema,
            exchange=exchange,
            name=unique_name("relay"),
        )
        with relay_thread(settings):
            deliveries = tap.drain(expected=4, timeout=20)
        check_history(written(engine, box), deliveries).assert_ok(max_duplicates=0)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("backend", "table", "schema"),
    [
        ("postgresql", "outbox", None),
        # Mixed case and a reserved word: every name must be quoted, in every statement.
        ("postgresql", "Order", f"Sales_{uuid.uuid4().hex[:8]}"),
        ("sqlite", "outbox", None),
    ],
    ids=["postgresql", "postgresql-quoted-names", "sqlite"],
)
def test_upgrade_gives_a_working_outbox_and_downgrade_leaves_nothing(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    amqp_url: str,
    tapped_exchange: tuple[QueueTap, str],
    backend: str,
    table: str,
    schema: str | None,
) -> None:
    url = request.getfixturevalue("fresh_pg_url" if backend == "postgresql" else "sqlite_url")
    project = AlembicProject.create(tmp_path / "app", url, table=table, schema=schema)
    project.add_migration(first_migration(table, schema))
    box = Outbox(table=table, schema=schema)
    engine = sa.create_engine(url)
    try:
        output = project.ok("upgrade", "head")
        assert f"{box.qualified_name}: created tables {table}, {table}_key" in output
        with engine.connect() as conn:
            found = check(box, conn)
        assert found.ok and not found.warnings, found
        tap, exchange = tapped_exchange
        assert_relay_publishes(url, amqp_url, box, tap, exchange)

        project.ok("downgrade", "base")
        assert leftovers(engine, schema) == []
    finally:
        engine.dispose()


def psql(url: str, script: str) -> None:
    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    result = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_offline_sql_is_the_ddl_of_init_db_and_applies_as_printed(
    tmp_path: Path, fresh_pg_url: str
) -> None:
    project = AlembicProject.create(tmp_path / "app", fresh_pg_url)
    project.add_migration(first_migration("outbox", None))
    box = Outbox()
    upgrade = project.run("upgrade", "head", "--sql")
    assert upgrade.returncode == 0, upgrade.stderr
    for statement in box.ddl_statements():
        assert statement.replace("\t", "    ").strip() + ";" in upgrade.stdout, statement
    psql(fresh_pg_url, upgrade.stdout)
    engine = sa.create_engine(fresh_pg_url)
    try:
        with engine.connect() as conn:
            found = check(box, conn)
        assert found.ok and not found.warnings, found
        downgrade = project.run("downgrade", "0001_outbox:base", "--sql")
        assert downgrade.returncode == 0, downgrade.stderr
        psql(fresh_pg_url, downgrade.stdout)
        assert leftovers(engine, None) == []
    finally:
        engine.dispose()


def test_autogenerate_writes_create_outbox_and_then_finds_nothing_to_do(
    tmp_path: Path, fresh_pg_url: str
) -> None:
    project = AlembicProject.create(tmp_path / "app", fresh_pg_url)
    project.ok("revision", "--autogenerate", "-m", "outbox", "--rev-id", "0001")
    (migration,) = project.versions.glob("0001_*.py")
    code = migration.read_text()
    assert "op.create_outbox()" in code and "op.drop_outbox()" in code, code
    assert "'orders'" in code, code  # the application's own table, as usual
    assert "outbox_key" not in code and "'outbox'" not in code, code

    project.ok("upgrade", "head")
    engine = sa.create_engine(fresh_pg_url)
    try:
        with engine.connect() as conn:
            assert check(Outbox(), conn).ok
        # No create_table for the outbox's tables, and no second create_outbox.
        assert "No new upgrade operations detected" in project.ok("check")
        project.ok("downgrade", "base")
        assert leftovers(engine, None) == []
    finally:
        engine.dispose()


def _migration_context(
    conn: sa.Connection, metadata: sa.MetaData, **opts: object
) -> MigrationContext:
    return MigrationContext.configure(connection=conn, opts={"target_metadata": metadata, **opts})


def test_autogenerate_api_leaves_the_tables_to_the_outbox_operations(fresh_pg_url: str) -> None:
    metadata = sa.MetaData()
    sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True))
    box = Outbox(metadata, table="Order", schema="Sales")
    engine = sa.create_engine(fresh_pg_url)
    try:
        with engine.begin() as conn:
            # No outbox yet: create_outbox for it, create_table for the application's table.
            context = _migration_context(conn, metadata, include_object=include_object)
            script = produce_migrations(context, metadata)
            upgrade = script.upgrade_ops
            assert upgrade is not None
            created = [op.table_name for op in upgrade.ops if isinstance(op, ops.CreateTableOp)]
            assert created == ["orders"]
            outbox_ops = [op for op in upgrade.ops if isinstance(op, CreateOutboxOp)]
            assert [(op.table, op.schema) for op in outbox_ops] == [("Order", "Sales")]
            rendered = render_python_code(upgrade)
            assert "op.create_outbox(table='Order', schema='Sales')" in rendered

            # Without the filter, autogenerate refuses to write create_table for them.
            bare = _migration_context(conn, metadata)
            with pytest.raises(OutboxMigrationError, match="include_object=outbox.alembic"):
                produce_migrations(bare, metadata)

            # Tables made by create_all lack the triggers: upgrade_outbox, not create_table.
            conn.exec_driver_sql('CREATE SCHEMA "Sales"')
            metadata.create_all(conn)
            script = produce_migrations(context, metadata)
            assert script.upgrade_ops is not None and script.downgrade_ops is not None
            assert [type(op) for op in script.upgrade_ops.ops] == [UpgradeOutboxOp]
            assert "op.upgrade_outbox(table='Order', schema='Sales', to_version=2)" in (
                render_python_code(script.upgrade_ops)
            )
            # Its downgrade: nothing to run, but a valid function body.
            downgrade = render_python_code(script.downgrade_ops)
            assert "op." not in downgrade, downgrade
            compile(f"def downgrade():\n{downgrade}", "downgrade", "exec")

            # A complete outbox: nothing to do.
            box.create(conn)
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_readme_upgrade_migration_upgrades_a_populated_schema_1_outbox(
    tmp_path: Path, fresh_pg_url: str
) -> None:
    # Given a database migrated to 0001_outbox under 0.1.0, whose outbox is of schema 1.
    engine = sa.create_engine(fresh_pg_url)
    try:
        install_v1(engine, "public")
        start = dt.datetime.now(dt.UTC)
        seqs = populate_v1(engine, "public", start)
        project = AlembicProject.create(tmp_path / "app", fresh_pg_url)
        first = project.add_migration(first_migration("outbox", None))
        project.add_migration(readme_blocks()["upgrade"].code)
        project.ok("stamp", first)
        # When the README's upgrade migration runs.
        output = project.ok("upgrade", "head")
        # Then every key keeps its state, and the output says which keys dead letters hold.
        assert "upgraded outbox from schema 1: 4 keys" in output and "1 of them held" in output
        assert_upgraded(engine, Outbox(), seqs, start)
    finally:
        engine.dispose()


def test_upgrade_outbox_refuses_what_it_cannot_do(tmp_path: Path, sqlite_url: str) -> None:
    project = AlembicProject.create(tmp_path / "app", sqlite_url)
    first = project.add_migration(first_migration("outbox", None))
    upgrade = readme_blocks()["upgrade"].code
    project.add_migration(upgrade)
    offline = project.run("upgrade", "head", "--sql")
    assert offline.returncode != 0 and "cannot write SQL for SQLite" in offline.stderr
    project.ok("upgrade", first)
    (project.versions / "0002_outbox_schema_2.py").write_text(
        upgrade.replace("to_version=2", "to_version=3")
    )
    newer = project.run("upgrade", "head")
    assert newer.returncode != 0 and "upgrade outbox-relay" in newer.stderr, newer.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_autogenerate_leaves_alone_an_outbox_the_metadata_does_not_declare(
    fresh_pg_url: str, version: int
) -> None:
    # Given an outbox in the database that the models do not declare (the application writes
    # with `Outbox()` on a MetaData of its own), of this version or of schema 1, with events.
    engine = sa.create_engine(fresh_pg_url)
    try:
        if version == 1:
            install_v1(engine, "public")
        else:
            Outbox().create(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO outbox (id, type, routing_key, payload, occurred_at) "
                "VALUES (gen_random_uuid(), 'a', 'a', '{}', now())"
            )
            conn.exec_driver_sql("CREATE TABLE legacy (id int PRIMARY KEY)")
        metadata = sa.MetaData()
        sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True))
        with engine.begin() as conn:
            context = _migration_context(conn, metadata, include_object=include_object)
            # When autogenerate compares the models with the database.
            diff = compare_metadata(context, metadata)
        # Then it drops what is not the outbox's, as usual, and nothing of the outbox.
        touched = sorted(
            {
                getattr(change[1], "name", None) or getattr(change[1], "table", None).name
                for change in diff
            }
        )
        assert touched == ["legacy", "orders"], diff
    finally:
        engine.dispose()
