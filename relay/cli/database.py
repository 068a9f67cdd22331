"""The admin API on a short-lived engine, for the operator commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from relay.errors import ConfigError
from relay.urls import mask_url

if TYPE_CHECKING:
    from relay.admin import Admin

DB_TIMEOUT = 10.0
"""Seconds an operator command waits for the database (connect and each statement)."""


@contextlib.contextmanager
def open_admin(database_url: str, table: str, schema: str | None, purpose: str) -> Iterator[Admin]:
    from outbox.errors import OutboxError
    from outbox.schema import Outbox
    from relay.admin import Admin
    from relay.store import create_engine

    try:
        box = Outbox(table=table, schema=schema)
    except OutboxError as exc:
        raise ConfigError(str(exc)) from None
    try:
        engine = create_engine(
            database_url, application_name=f"outbox-relay:{purpose}", db_timeout=DB_TIMEOUT
        )
    except Exception as exc:  # a malformed URL or an unknown driver
        raise ConfigError(f"--database-url {mask_url(database_url)} is not usable: {exc}") from exc
    try:
        yield Admin(engine, box)
    finally:
        engine.dispose()
