"""Fixtures of the integration tier's store tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from outbox import Outbox
from relay.store import Store


@pytest.fixture(params=["postgresql", "sqlite"])
def setup(
    request: pytest.FixtureRequest, pg_engine: sa.Engine, outbox_schema: Outbox, sqlite_url: str
) -> Iterator[tuple[Store, sa.Engine, Outbox]]:
    """A store on each backend, with its engine and its outbox."""
    if request.param == "sqlite":
        box = Outbox()
        engine = sa.create_engine(sqlite_url)
        box.create(engine)
        yield Store(engine, box, db_timeout=10), engine, box
        engine.dispose()
    else:
        yield Store(pg_engine, outbox_schema, db_timeout=10), pg_engine, outbox_schema
