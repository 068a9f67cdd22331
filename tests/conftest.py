"""Fixtures shared by every test tier.

Integration tests talk to the real PostgreSQL and RabbitMQ. Each test gets a PostgreSQL schema
of its own (`outbox_schema`), so tests never see each other's rows; a rollback-per-test fixture
would not do, because the relay reads on its own connection.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from outbox import Outbox
from tests.support.rabbit import QueueTap, unique_name

PG_ADMIN_DSN = os.environ.get(
    "OUTBOX_TEST_PG_ADMIN_DSN", "host=127.0.0.1 user=root dbname=postgres"
)
TEST_DATABASE = os.environ.get("OUTBOX_TEST_DATABASE", "outbox_test")
PG_URL = f"postgresql+psycopg://root@127.0.0.1:5432/{TEST_DATABASE}"
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _ensure_database() -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (TEST_DATABASE,)
        ).fetchone()
        if not exists:
            # Two pytest processes may start at once (`make test`): one of them creates it.
            with contextlib.suppress(
                psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation
            ):
                conn.execute(f'CREATE DATABASE "{TEST_DATABASE}"')


@pytest.fixture(scope="session")
def pg_url() -> str:
    _ensure_database()
    return PG_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url, pool_size=10, max_overflow=20)
    yield engine
    engine.dispose()


@pytest.fixture
def schema_name(pg_engine: sa.Engine) -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def outbox_schema(pg_engine: sa.Engine, schema_name: str) -> Outbox:
    """The outbox tables, created in this test's own schema."""
    outbox = Outbox(schema=schema_name)
    outbox.create(pg_engine)
    return outbox


@pytest.fixture
def quoted_outbox(pg_engine: sa.Engine) -> Iterator[Outbox]:
    """The outbox tables under names that need quoting: a mixed-case schema, and a table
    named by a reserved word in mixed case. Dropped after the test."""
    box = Outbox(table="Order", schema=f"Mixed_{uuid.uuid4().hex[:6]}")
    box.create(pg_engine)
    yield box
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{box.schema}" CASCADE')


@pytest.fixture
def tapped_exchange(amqp_url: str) -> Iterator[tuple[QueueTap, str]]:
    """A fresh topic exchange with a tap queue bound to all of it (both deleted afterwards)."""
    with QueueTap(amqp_url) as tap:
        exchange = tap.declare_exchange(unique_name("ex"))
        tap.bind(exchange)
        yield tap, exchange


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/outbox.db"
