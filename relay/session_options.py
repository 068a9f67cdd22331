"""The relay's session settings: carried in libpq's `options` at connection, and checked there.

The relay's connections set their sessions up through `options` (`relay.store.create_engine`
says which settings and why). A pooler such as PgBouncer does not pass them on: it refuses
`options` at connection ("unsupported startup parameter"), or, with
`ignore_startup_parameters = options`, drops them without a word. Either way the session
lacks what the relay asked for, and so does every option the user gave (the URL's
`?options=`, a libpq service's, or `PGOPTIONS`: `url_options`): a `search_path`, which then
silently points the relay at another outbox.

So every set of options the relay sends carries a marker setting (`outbox_relay.session`,
a custom setting, which PostgreSQL accepts under any name with a dot), and each new
connection looks for it before it is used (`SessionCheck`, `arrived`): present, the options
arrived; missing, they did not, and the connection is behind such a pooler. Without options
of the user's own, the relay goes on without its settings and says once what to set
instead; with them, it stops with a configuration error, as it cannot do what they ask.
The look waits at most the database deadline on its own (it runs before the store's
deadline watchdog guards the connection, and before SQLAlchemy's first queries).
"""

from __future__ import annotations

import logging
import os
import re
import select
import time
import uuid
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import pq

from relay.errors import ConfigError

log = logging.getLogger("relay.store")

SESSION_MARK = "outbox_relay.session"
# On a connection record: whether the session's settings arrived (False behind a pooler).
OPTIONS_ARRIVED = "outbox_relay.options_arrived"
# PgBouncer's answers to `options` it does not pass on ("unsupported startup parameter:
# options"; newer releases also "unsupported startup parameter in options: ..." and
# "unsupported options startup parameter: only '-c config=val' is allowed").
_REFUSED = re.compile(r"unsupported (options )?startup parameter")

ROLE_SETTINGS_ADVICE = (
    "set them for the relay's role instead (ALTER ROLE ... SET statement_timeout, "
    "idle_in_transaction_session_timeout, synchronous_commit = off, and "
    "default_transaction_isolation = 'read committed' where the database's default is "
    "stricter), or use the pooler's own timeouts (PgBouncer: query_timeout, "
    "idle_transaction_timeout)"
)


def url_options(url: sa.URL) -> tuple[sa.URL, str | None]:
    """`url` without its `options`, and the user's options as one libpq options string, or
    None, in libpq's order: the URL's (several `options=` are joined), or else those of
    the libpq service it names (`?service=`, `PGSERVICE`), or else `PGOPTIONS`; options
    given to libpq would otherwise silently replace the latter two. A dangling backslash at
    the end of one is dropped: alone it escapes nothing; before options that follow it, it
    would escape the space between them."""
    given = url.query.get("options")
    pieces = list(given) if isinstance(given, tuple) else [given] if given else []
    if not pieces:
        service = _service_options(url)
        if service:
            pieces = [service]
    if not pieces and os.environ.get("PGOPTIONS"):
        pieces = [os.environ["PGOPTIONS"]]
    cleaned = [_without_dangling_escape(piece) for piece in pieces]
    joined_options = " ".join(piece for piece in cleaned if piece)
    return url.difference_update_query(["options"]), joined_options or None


def _service_options(url: sa.URL) -> str | None:
    """The options of the libpq service `url` names (`?service=`, else `PGSERVICE`), read
    from its service file as libpq reads it: the user's (`PGSERVICEFILE`, else
    `~/.pg_service.conf`) first, then `PGSYSCONFDIR/pg_service.conf`. Only the files: no
    connection, no name lookup."""
    service = url.query.get("service") or os.environ.get("PGSERVICE")
    if not service:
        return None
    name = service[-1] if isinstance(service, tuple) else service
    files = [os.environ.get("PGSERVICEFILE") or os.path.expanduser("~/.pg_service.conf")]
    if os.environ.get("PGSYSCONFDIR"):
        files.append(os.path.join(os.environ["PGSYSCONFDIR"], "pg_service.conf"))
    for path in files:
        found = _service_in(path, name)
        if found is not None:
            return found.get("options") or None
    return None


def _service_in(path: str, name: str) -> dict[str, str] | None:
    """The settings of service `name` in the file at `path`, or None if it has none
    (libpq's format: `[name]`, then `keyword=value` lines; `#` starts a comment line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    settings: dict[str, str] | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            if settings is not None:
                return settings
            settings = {} if line[1:-1] == name else None
        elif settings is not None and "=" in line:
            keyword, _, value = line.partition("=")
            settings[keyword.strip()] = value.strip()
    return settings


def _without_dangling_escape(options: str) -> str:
    options = options.rstrip()
    trailing = len(options) - len(options.rstrip("\\"))
    return options[:-1].rstrip() if trailing % 2 else options


def marker() -> str:
    """A value for the marker, new for each engine or listener: a database or role default
    of the same setting can never pass for it."""
    return uuid.uuid4().hex


def marked(value: str) -> str:
    """The options that set the marker to `value`."""
    return f"-c {SESSION_MARK}={value}"


def joined(*options: str | None) -> str:
    """Options strings, the later ones winning where two set the same setting."""
    return " ".join(o for o in options if o)


def refused(exc: BaseException) -> bool:
    """The server refused a startup parameter (a pooler that does not pass `options` on)."""
    return isinstance(exc, psycopg.OperationalError) and bool(_REFUSED.search(str(exc)))


def arrived(connection: psycopg.Connection[Any], value: str, timeout: float) -> bool:
    """Whether this session got the options it was opened with (the marker set to `value`
    among them).

    Sent on libpq directly and waited for at most `timeout` (psycopg's own calls wait as
    long as the network lets them). As one simple query outside any transaction, read to
    its end (an error too), it leaves the session as it found it. Past the timeout the
    connection is closed and the error says so."""
    pgconn = connection.pgconn
    deadline = time.monotonic() + timeout
    pgconn.send_query(f"SELECT current_setting('{SESSION_MARK}', true)".encode())
    while pgconn.flush():
        _wait(connection, deadline, select.POLLOUT)
    found: bytes | None = None
    error: str | None = None
    while True:
        while pgconn.is_busy():
            _wait(connection, deadline, select.POLLIN)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == pq.ExecStatus.TUPLES_OK:
            found = result.get_value(0, 0) if result.ntuples else None
        elif error is None:
            error = (result.error_message or b"").decode(errors="replace").strip()
    if error is not None:
        raise psycopg.OperationalError(f"checking the session's settings: {error}")
    return found == value.encode()


def _wait(connection: psycopg.Connection[Any], deadline: float, events: int) -> None:
    # poll, not select: a process may well have more than 1,024 descriptors open.
    poller = select.poll()
    poller.register(connection.pgconn.socket, events | select.POLLERR | select.POLLHUP)
    remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
    if not poller.poll(remaining_ms):
        connection.close()
        raise psycopg.OperationalError(
            "the database did not answer the check of a new connection's settings in time"
        )


def where(url: sa.URL) -> str:
    """host:port/database, for messages (never the URL's credentials or query)."""
    hosts = url.query.get("host")
    if hosts:
        host = ",".join(hosts) if isinstance(hosts, tuple) else hosts
        return f"{host}/{url.database or ''}"
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def dropped_user_options(given: str, place: str) -> str:
    return (
        f"the database at {place} does not receive libpq's startup options (a pooler such "
        f"as PgBouncer refuses or ignores them), so the options {given!r} (of "
        "--database-url, a libpq service or PGOPTIONS) cannot take effect: set them for the "
        "database role instead (ALTER ROLE ... SET search_path = ..., and so on) and take "
        "them out of the URL and the environment"
    )


class SessionCheck:
    """`do_connect` and `connect` listeners of one engine (`relay.store.create_engine`):
    connect without `options` where the server refuses them, then look for the marker on
    every new connection (see the module docstring). `given`: the user's own options
    (`url_options`); `timeout`: the longest wait for the look."""

    def __init__(self, url: sa.URL, given: str | None, *, timeout: float) -> None:
        self._place = where(url)
        self._given = given
        self._timeout = timeout
        self._marker = marker()
        self._warned = False  # that a connection of this engine lacked the marker

    @property
    def options(self) -> str:
        """The options to connect with: the user's, then the marker."""
        return joined(self._given, marked(self._marker))

    def connect(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except psycopg.OperationalError as exc:
            if not refused(exc) or "options" not in cparams:
                raise
            first = exc
        # Without them (on a copy: some SQLAlchemy releases share `cparams` between the
        # connections of an engine); `verify` then finds the marker missing.
        try:
            return dialect.connect(*cargs, **{k: v for k, v in cparams.items() if k != "options"})
        except psycopg.OperationalError as exc:
            if refused(exc) and self._given:  # libpq sent PGOPTIONS again
                raise ConfigError(dropped_user_options(self._given, self._place)) from exc
            raise exc from first  # refused for another parameter, or another failure

    def verify(self, dbapi_connection: psycopg.Connection[Any], record: Any) -> None:
        """Before anything else on a new connection (also SQLAlchemy's own first queries:
        see `listen`), so that this bounded look is the first to wait for the server."""
        if record.info.get(SESSION_MARK):
            return  # looked at already, on this engine's first connection
        try:
            present = arrived(dbapi_connection, self._marker, self._timeout)
        except BaseException:
            dbapi_connection.close()  # whatever the SQLAlchemy release does with it
            raise
        record.info[OPTIONS_ARRIVED] = present
        if present:
            record.info[SESSION_MARK] = True
            return
        place = _place_of(dbapi_connection) or self._place
        if self._given:
            dbapi_connection.close()
            raise ConfigError(dropped_user_options(self._given, place))
        record.info[SESSION_MARK] = True
        if not self._warned:
            self._warned = True
            log.warning(
                "the database at %s did not receive the relay's session settings (libpq's "
                "startup options; a pooler such as PgBouncer refuses or ignores them): going "
                "on without them; %s",
                place,
                ROLE_SETTINGS_ADVICE,
            )

    def listen(self, engine: sa.Engine) -> None:
        """Attach to `engine`. On its first connection the look goes before SQLAlchemy's own
        first queries (the server's version and such), which wait without a bound."""
        sa.event.listen(engine, "do_connect", self.connect)
        sa.event.listen(engine, "first_connect", self.verify, insert=True)
        sa.event.listen(engine, "connect", self.verify)


def _place_of(connection: psycopg.Connection[Any]) -> str | None:
    try:
        info = connection.info
        return f"{info.host}:{info.port}/{info.dbname}"
    except psycopg.Error:
        return None
