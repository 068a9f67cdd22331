"""Ending a pool's PostgreSQL sessions from the server side, as a restart or an operator's
pg_terminate_backend would, while the pool still holds them as idle connections."""

from __future__ import annotations

import contextlib

import sqlalchemy as sa


def terminate_pooled_sessions(engine: sa.Engine, admin: sa.Engine, count: int = 1) -> None:
    """Check out `count` connections of `engine` at once (all of a pool that size), return
    them to the pool, and end their sessions through `admin`."""
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(engine.connect()) for _ in range(count)]
        pids = [int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()) for conn in conns]
    with admin.connect() as conn:
        for pid in pids:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
