"""LISTEN for the outbox's NOTIFY so the relay wakes at commit instead of at its next poll.

A notification is a hint, never the only way: nothing is delivered while the listener is
disconnected, so after every (re)connection the listener wakes the relay once to look.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg

from relay.backoff import backoff_delay
from relay.deadline import Watchdog
from relay.session_options import arrived, joined, marked, marker, refused, url_options
from relay.urls import mask_text

log = logging.getLogger("relay.listener")


def psycopg_dsn(database_url: str) -> str:
    """A libpq connection string for psycopg from a SQLAlchemy URL, built by SQLAlchemy's own
    psycopg dialect so that the LISTEN connection goes where the relay's engine goes: several
    hosts (`?host=a:5432&host=b:5432`, or libpq's `?host=a,b&port=5432,5432`) and
    `target_session_attrs=read-write` included. Its options are the URL's, with the marker
    that tells whether they arrived (`relay.session_options`)."""
    return _dsn(database_url, None)


def _dsn(database_url: str, mark: str | None) -> str:
    url, given = url_options(sa.make_url(database_url).set(drivername="postgresql+psycopg"))
    dialect = postgresql_psycopg.dialect()  # type: ignore[no-untyped-call]
    _, params = dialect.create_connect_args(url)  # type: ignore[no-untyped-call]
    params.pop("context", None)  # SQLAlchemy's adapters map, not a libpq parameter
    options = joined(given, marked(mark) if mark is not None else None)
    if options:
        params["options"] = options
    return make_conninfo(**{k: str(v) for k, v in params.items()})


class Listener:
    """The LISTEN connection, on its own thread; reconnects whenever the link fails.

    Why a dead link is always noticed: a reset or a closed peer fails the next read at once;
    a link that silently stopped carrying bytes (a blackhole) fails nothing by itself, because
    waiting for a notification is only waiting to read. TCP keepalives catch a dead peer
    behind a real network; an application-level ping (`SELECT 1` every `ping_every` seconds,
    with a watchdog that shuts the socket down after `ping_timeout`) also catches a link that
    still acknowledges TCP but delivers nothing (a stuck proxy or middlebox). A failed ping
    ends the connection like any other error, and the loop reconnects with backoff.
    """

    def __init__(
        self,
        database_url: str,
        channel: str,
        wake: Callable[[], None],
        *,
        application_name: str,
        check_every: float = 0.25,
        ping_every: float = 10.0,
        ping_timeout: float = 5.0,
        connect_timeout: int = 5,
    ) -> None:
        self._marker = marker()
        self._dsn = _dsn(database_url, self._marker)
        self._channel = channel
        self._wake = wake
        self._application_name = application_name[:63]
        self._check_every = check_every
        self._ping_every = ping_every
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)
        self._watchdog: Watchdog | None = None
        self.notifications_total = 0
        self.connections_total = 0  # LISTEN connections established so far
        self.behind_pooler = False  # found out, and stopped (`_behind_pooler`)

    def start(self) -> None:
        self._watchdog = Watchdog(name="outbox-listener-watchdog")
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._watchdog is not None:
            self._watchdog.stop()

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            self._dsn,
            autocommit=True,
            application_name=self._application_name,
            connect_timeout=self._connect_timeout,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            # Unacknowledged data (a ping into a dead network) fails the socket after this.
            tcp_user_timeout=int((self._ping_timeout + 10) * 1000),
            # The ping, prepared after five, would fail behind a pooler in transaction mode
            # (another server session each time; see `relay.store.create_engine`).
            prepare_threshold=None,
        )

    def _behind_pooler(self) -> None:
        """The connection's startup options did not arrive: a pooler (PgBouncer, in any pool
        mode). In transaction mode a LISTEN stays on a pooled server session after this
        client is gone, and its notifications go to whichever client gets that session next
        (where they pile up unread): never LISTEN through one. The relay polls instead."""
        self.behind_pooler = True
        log.warning(
            "LISTEN turned off: the database is reached through a pooler (PgBouncer?), "
            "where a LISTEN stays on a pooled server session and its notifications reach "
            "other clients; the relay polls instead (--poll-interval). Run with --no-listen "
            "to say so"
        )

    def _ping(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert self._watchdog is not None
        with self._watchdog.guard(conn.fileno(), self._ping_timeout):
            conn.execute("SELECT 1")

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    if not arrived(conn, self._marker, self._ping_timeout):
                        self._behind_pooler()
                        return
                    assert self._watchdog is not None
                    with self._watchdog.guard(conn.fileno(), self._ping_timeout):
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.connections_total += 1
                    if failures:
                        log.info("listener reconnected after %d failed attempts", failures)
                    failures = 0
                    self._wake()  # whatever was committed while we were not listening
                    next_ping = time.monotonic() + self._ping_every
                    while not self._stop.is_set():
                        # The timeout bounds how long stop() waits and how soon a dead
                        # connection is noticed.
                        for _ in conn.notifies(timeout=self._check_every, stop_after=1):
                            self.notifications_total += 1
                            self._wake()
                        if time.monotonic() >= next_ping:
                            # Notifications that arrive meanwhile wait in psycopg's backlog
                            # for the next notifies().
                            self._ping(conn)
                            next_ping = time.monotonic() + self._ping_every
            except Exception as exc:
                if refused(exc):
                    self._behind_pooler()
                    return
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning(
                        "listener connection lost (%s); reconnecting, polling covers the gap",
                        mask_text(str(exc)).strip() or type(exc).__name__,
                    )
            self._stop.wait(backoff_delay(failures, initial=0.5, maximum=10.0))
