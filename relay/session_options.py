"""The relay's session settings: carried in libpq's `options` at connection, and checked there.

The relay's connections set their sessions up through `options` (`relay.store.create_engine`
says which settings and why). A pooler in transaction mode such as PgBouncer does not pass
them on: it refuses `options` at connection ("unsupported startup parameter"), or, with
`ignore_startup_parameters = options`, drops them without a word. Either way the session
lacks what the relay asked for, and so does every `options` the URL gave (a `search_path`,
which then silently points the relay at another outbox).

So every set of options the relay sends carries a marker setting (`outbox_relay.session`,
a custom setting, which PostgreSQL accepts under any name with a dot), and a connection
looks for it before it is used: present, the options arrived; missing, they did not, and
the connection is behind such a pooler. Without options of the URL's own, the relay goes on
without its settings and says once what to set instead; with them, it refuses, as it cannot
do what the URL asks.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import sqlalchemy as sa

log = logging.getLogger("relay.store")

SESSION_MARK = "outbox_relay.session"
MARKED = f"-c {SESSION_MARK}=on"
# What PgBouncer answers a startup parameter it does not pass on.
REFUSED = "unsupported startup parameter"

ROLE_SETTINGS_ADVICE = (
    "set them for the relay's role instead (ALTER ROLE ... SET statement_timeout, "
    "idle_in_transaction_session_timeout, synchronous_commit = off, and "
    "default_transaction_isolation = 'read committed' where the database's default is "
    "stricter), or use the pooler's own timeouts (PgBouncer: query_timeout, "
    "idle_transaction_timeout)"
)


def url_options(url: sa.URL) -> tuple[sa.URL, str | None]:
    """`url` without its `options`, and those as one libpq options string or None: several
    `options=` are joined, and a dangling backslash at the end is dropped (alone it escapes
    nothing; before options that follow it would escape the space between them)."""
    given = url.query.get("options")
    if not given:
        return url, None
    joined = " ".join(given) if isinstance(given, tuple) else given
    trailing = len(joined) - len(joined.rstrip("\\"))
    if trailing % 2:
        joined = joined[:-1]
    return url.difference_update_query(["options"]), joined.strip() or None


def joined(*options: str | None) -> str:
    """Options strings, the later ones winning where two set the same setting."""
    return " ".join(o for o in options if o)


def refused(exc: BaseException) -> bool:
    """The server refused a startup parameter (a pooler that does not pass `options` on)."""
    return isinstance(exc, psycopg.OperationalError) and REFUSED in str(exc)


def arrived(connection: psycopg.Connection[Any]) -> bool:
    """Whether this session got the options it was opened with (`MARKED` among them)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT current_setting('{SESSION_MARK}', true)")
        row = cursor.fetchone()
    return row is not None and row[0] == "on"


def where(url: sa.URL) -> str:
    """host:port/database, for messages (never the URL's credentials or query)."""
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def dropped_url_options(given: str, place: str) -> str:
    return (
        f"the database at {place} did not receive libpq's startup options (a pooler such as "
        f"PgBouncer refuses or ignores them), so the --database-url options {given!r} "
        "cannot take effect: set them for the relay's role instead (ALTER ROLE ... SET "
        "search_path = ..., and so on) and take them out of the URL"
    )


class SessionCheck:
    """`do_connect` and `connect` listeners of one engine (`relay.store.create_engine`):
    connect without `options` where the server refuses them, then look for the marker on
    every new connection (see the module docstring)."""

    def __init__(self, url: sa.URL, given: str | None) -> None:
        self._place = where(url)
        self._given = given
        self.behind_pooler = False  # a connection of this engine lacked the marker

    def connect(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except psycopg.OperationalError as exc:
            if not refused(exc) or "options" not in cparams:
                raise
        # Without them; `verify` then finds the marker missing.
        cparams.pop("options")
        return dialect.connect(*cargs, **cparams)

    def verify(self, dbapi_connection: psycopg.Connection[Any], record: Any) -> None:
        try:
            present = arrived(dbapi_connection)
        finally:
            dbapi_connection.rollback()
        if present:
            return
        if self._given:
            dbapi_connection.close()
            raise psycopg.OperationalError(dropped_url_options(self._given, self._place))
        if not self.behind_pooler:
            self.behind_pooler = True
            log.warning(
                "the database at %s did not receive the relay's session settings (libpq's "
                "startup options; a pooler such as PgBouncer refuses or ignores them): going "
                "on without them; %s",
                self._place,
                ROLE_SETTINGS_ADVICE,
            )
