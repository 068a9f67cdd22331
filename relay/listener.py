"""LISTEN for the outbox's NOTIFY so the relay wakes at commit instead of at its next poll.

A notification is a hint, never the only way: nothing is delivered while the listener is
disconnected, so after every (re)connection the listener wakes the relay once to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import psycopg
import sqlalchemy as sa
from psycopg import pq, sql
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


class _Watch:
    """One LISTEN connection's socket, watched by the relay's loop.

    The thread makes it and hands it over; from then on the loop alone reads and writes the
    connection (libpq allows one user at a time), until `ended` is set: the loop no longer
    watches the socket, and the thread may close it. `failure` (set before `ended`) is why,
    when the connection failed. `watching` and `ended` change under `lock`: the thread may
    end a watch the loop has not started (it then never starts), never one it has.
    `ping_deadline` is the loop's: the timer of the ping awaiting its answer, if one is;
    `proven`, whether a ping of this connection was answered (set by the loop)."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        self.pgconn = conn.pgconn
        self.fd = conn.fileno()
        self.lock = threading.Lock()
        self.watching = False
        self.ping_deadline: asyncio.TimerHandle | None = None
        self.ended = threading.Event()
        self.failure: BaseException | None = None
        self.proven = False

    def end_if_unwatched(self) -> bool:
        """Any thread: end this watch if the loop has not started watching it (it then never
        will); whether it is ended now."""
        with self.lock:
            if not self.watching:
                self.ended.set()
        return self.ended.is_set()


class Listener:
    """The LISTEN connection: made, checked and remade on its own thread, read on the relay's
    loop.

    Why the loop reads it: a notification read on a thread of its own woke that thread, then
    the loop through its wake-up pipe, for every event (at 200 events/s, 3% of the relay's
    CPU, 0.1 ms of the commit-to-delivery p50 and 15% of its p99: `bench/HISTORY.md`). The
    loop watches the socket instead (`add_reader`) and wakes the relay where it already is.
    The thread still connects, checks for a pooler, LISTENs, pings, and reconnects; once
    listening it hands the connection to the loop (`_Watch`), which from then on alone reads
    and writes it, the ping included, until it stops watching it: only then does the thread
    close it (a descriptor closed while watched, then reused by the next connection, would
    confuse the loop's selector).

    Why a dead link is always noticed: a reset or a closed peer fails the next read at once
    (the loop sees the socket readable, and the read fails); a link that silently stopped
    carrying bytes (a blackhole) fails nothing by itself, because waiting for a notification
    is only waiting to read. TCP keepalives catch a dead peer behind a real network; an
    application-level ping (`SELECT 1` every `ping_every` seconds, given up after
    `ping_timeout`) also catches a link that still acknowledges TCP but delivers nothing (a
    stuck proxy or middlebox). A failed or unanswered ping ends the connection like any other
    error, and the thread reconnects with backoff.

    `stop()` may come from any thread; on the loop's own (as the relay's shutdown, between
    the loop's runs) it takes the connection back at once."""

    def __init__(
        self,
        database_url: str,
        channel: str,
        wake: Callable[[], None],
        *,
        loop: asyncio.AbstractEventLoop,
        application_name: str,
        ping_every: float = 10.0,
        ping_timeout: float = 5.0,
        connect_timeout: int = 5,
    ) -> None:
        self._marker = marker()
        self._dsn = _dsn(database_url, self._marker)
        self._channel = channel
        self._wake = wake
        self._loop = loop
        self._application_name = application_name[:63]
        self._ping_every = ping_every
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)
        self._watchdog: Watchdog | None = None
        self._watch: _Watch | None = None  # the connection the loop watches, if any
        self._loop_thread: int | None = None  # the thread seen running the loop
        self.notifications_total = 0
        self.connections_total = 0  # LISTEN connections established so far
        self.behind_pooler = False  # found out, and stopped (`_behind_pooler`)

    def start(self) -> None:
        self._watchdog = Watchdog(name="outbox-listener-watchdog")
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            self._take_back(watch, timeout)
        self._thread.join(timeout)
        if self._watchdog is not None:
            self._watchdog.stop()

    def _take_back(self, watch: _Watch, timeout: float) -> None:
        """End `watch`: at once on the loop's own thread (running it, or between its runs:
        the relay's shutdown), or where the loop has not started watching it; otherwise on
        the loop's next round, waited for up to `timeout` (the loop's state is its thread's
        alone)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        on_loop_thread = running is self._loop or (
            not self._loop.is_running() and self._loop_thread == threading.get_ident()
        )
        if on_loop_thread:
            self._unwatch(watch)
            return
        if watch.end_if_unwatched():
            return
        with contextlib.suppress(RuntimeError):  # closed: nothing is watched any more
            self._loop.call_soon_threadsafe(self._unwatch, watch)
            watch.ended.wait(timeout)

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
            # The pooler check's statements, prepared after five, would fail behind a pooler
            # in transaction mode (see `relay.store.create_engine`).
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

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and not self._loop.is_closed():  # closed: the relay is gone
            try:
                # Closed, not left through `with`: that would first commit, and the loop may
                # have left a ping unanswered on it (a command libpq still waits for).
                conn = self._connect()
                try:
                    if not arrived(conn, self._marker, self._ping_timeout):
                        self._behind_pooler()
                        return
                    assert self._watchdog is not None
                    with self._watchdog.guard(conn.fileno(), self._ping_timeout):
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.connections_total += 1
                    if failures:
                        log.info("listener reconnected after %d failed attempts", failures)
                    self._wake()  # whatever was committed while we were not listening
                    watch = _Watch(conn)
                    try:
                        self._listen_on_loop(watch)
                    finally:
                        # The backoff starts over only for a connection that answered a
                        # ping: one that LISTENs and then fails at once every time (a
                        # proxy that cuts idle links, a server that ends new sessions) is
                        # one outage, retried ever more slowly, not a reconnect every
                        # half second.
                        if watch.proven:
                            failures = 0
                finally:
                    conn.close()
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

    def _listen_on_loop(self, watch: _Watch) -> None:
        """Hand the connection to the loop and ask it for a ping every `ping_every`, until
        the loop ends the watch (the connection failed, a ping went unanswered, or the
        listener stops); returns (or raises why) only once the loop no longer watches it.

        The ping and its deadline live on the loop: its answer is read before its deadline
        is looked at in the same round (asyncio runs what the sockets brought before the
        timers that came due), so a loop that did not run for a while (the relay's step)
        says nothing of the link; and this thread waits on nothing but the watch's end."""
        self._watch = watch
        try:
            if self._stop.is_set():
                return  # stop() found no connection to take back from the loop
            self._loop.call_soon_threadsafe(self._watch_start, watch)
            while not watch.ended.wait(self._ping_every):
                self._loop.call_soon_threadsafe(self._send_ping, watch)
            if watch.failure is not None:
                raise watch.failure
        except RuntimeError:
            if not self._loop.is_closed():
                raise
            # The loop is closed: the relay is gone, and nothing is watched any more.
        finally:
            if not watch.end_if_unwatched():
                # Only if the loop is closed (nothing is watched any more) or something
                # unforeseen raised above: the loop takes it back before it is closed.
                with contextlib.suppress(RuntimeError):  # closed: nothing is watched any more
                    self._loop.call_soon_threadsafe(self._unwatch, watch)
                while not watch.ended.wait(0.25) and not self._loop.is_closed():
                    pass
            self._watch = None

    # -- on the loop ---------------------------------------------------------------------

    def _watch_start(self, watch: _Watch) -> None:
        with watch.lock:
            if watch.ended.is_set():
                return  # taken back before the loop came to it
            self._loop.add_reader(watch.fd, self._readable, watch)
            watch.watching = True
            self._loop_thread = threading.get_ident()
        self._readable(watch)  # what came in with the LISTEN's answer is not on the socket

    def _readable(self, watch: _Watch) -> None:
        """The socket has data: notifications (one wake-up for all of them), or the ping's
        answer."""
        pgconn = watch.pgconn
        try:
            pgconn.consume_input()
            if watch.ping_deadline is not None:
                while not pgconn.is_busy():
                    result = pgconn.get_result()
                    if result is None:
                        watch.ping_deadline.cancel()
                        watch.ping_deadline = None
                        watch.proven = True
                        break
                    if result.status != pq.ExecStatus.TUPLES_OK:
                        raise psycopg.OperationalError(
                            f"the ping failed: {result.error_message.decode(errors='replace')}"
                        )
            # After the ping's results: reading them parses what came behind them too (a
            # NOTIFY right after the answer), and the socket may not be readable again.
            notified = 0
            while pgconn.notifies() is not None:
                notified += 1
        except Exception as exc:  # the connection failed: the thread makes a new one
            watch.failure = exc
            self._unwatch(watch)
            return
        if notified:
            self.notifications_total += notified
            self._wake()

    def _send_ping(self, watch: _Watch) -> None:
        if watch.ended.is_set() or watch.ping_deadline is not None:
            return  # ended, or the last ping still awaits its answer (and has its deadline)
        try:
            watch.pgconn.send_query(b"SELECT 1")
            # A few bytes: sent at once unless the link is clogged, and then the ping goes
            # unanswered and its deadline ends the connection.
            watch.pgconn.flush()
        except Exception as exc:
            watch.failure = exc
            self._unwatch(watch)
            return
        watch.ping_deadline = self._loop.call_later(self._ping_timeout, self._ping_overdue, watch)

    def _ping_overdue(self, watch: _Watch) -> None:
        watch.ping_deadline = None
        watch.failure = TimeoutError(f"no answer to a ping within {self._ping_timeout} s")
        self._unwatch(watch)

    def _unwatch(self, watch: _Watch) -> None:
        with watch.lock:
            if watch.watching:
                self._loop.remove_reader(watch.fd)
                watch.watching = False
            if watch.ping_deadline is not None:
                watch.ping_deadline.cancel()
                watch.ping_deadline = None
            watch.ended.set()
