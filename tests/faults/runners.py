"""Relays under test (in a thread, or as `outbox-relay run` processes) and the levers fault tests
pull on them: URLs through a fault proxy, killing their database sessions, signals.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa

from relay.app import build_relay
from relay.relay import Relay
from relay.settings import RelaySettings
from relay.store import Store
from tests.faults.proxy import FaultProxy
from tests.support.relays import start_relay_process

#: How long a relay may take to stop gracefully before the test calls it stuck.
STOP_TIMEOUT = 30.0


# -- addresses -----------------------------------------------------------------------------------


def pg_address(pg_url: str) -> tuple[str, int]:
    url = sa.make_url(pg_url)
    return url.host or "127.0.0.1", url.port or 5432


def amqp_address(amqp_url: str) -> tuple[str, int]:
    parts = urlsplit(amqp_url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def via_proxy_pg(pg_url: str, proxy: FaultProxy) -> str:
    url = sa.make_url(pg_url).set(host=proxy.listen_host, port=proxy.port)
    return url.render_as_string(hide_password=False)


def via_proxy_amqp(amqp_url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(amqp_url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{proxy.address}" if userinfo else proxy.address
    return urlunsplit(parts._replace(netloc=netloc))


# -- a relay in a thread of the test process ------------------------------------------------------


class RelayThread:
    """`Relay.run()` in a thread, watched: a relay that exits on its own (an exception, or
    `run()` returning without a stop request) is a test failure, reported by `assert_running`.
    """

    def __init__(
        self,
        settings: RelaySettings,
        *,
        on_stuck: Callable[[], None] | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.settings = settings
        self.on_stuck = on_stuck
        self.relay: Relay = relay if relay is not None else build_relay(settings)
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=f"relay-{settings.name}")

    def __enter__(self) -> RelayThread:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.stop()
            return
        # The test failed already, and the relay may well be stuck: unstick it soon, and let
        # the test's own failure be the one reported.
        try:
            self.stop(grace=5.0)
        except Exception as stop_error:
            print(f"stopping relay {self.settings.name} after the failure: {stop_error!r}")

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:  # surfaced by assert_running()/stop()
            self.errors.append(exc)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stacks(self) -> str:
        """Where the relay's threads (loop, database, publisher) are right now: evidence for
        a stuck relay."""
        frames = sys._current_frames()
        parts = []
        for thread in threading.enumerate():
            frame = frames.get(thread.ident or -1)
            if frame is not None and (thread is self._thread or thread.name.startswith("relay")):
                parts.append(f"--- thread {thread.name}\n" + "".join(traceback.format_stack(frame)))
        return "\n".join(parts)

    def assert_running(self) -> None:
        if self.errors:
            raise AssertionError(f"the relay exited on its own: {self.errors[0]!r}")
        assert self.alive, "the relay exited on its own (run() returned without a stop request)"

    def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """Stop gracefully; a relay still running after `grace` seconds is a failure. `on_stuck`
        (e.g. stopping the proxies, which closes every socket) is called then, so that a stuck
        relay thread does not outlive its test."""
        self.relay.request_stop()
        self._thread.join(grace)
        stuck = self._thread.is_alive()
        if stuck and self.on_stuck is not None:
            self.on_stuck()
            self._thread.join(STOP_TIMEOUT)
        if not self._thread.is_alive():
            self.relay.store.engine.dispose()
        assert not stuck, f"the relay did not stop within {grace} s of request_stop()"
        if self.errors:
            raise self.errors[0]


# -- a relay process ------------------------------------------------------------------------------


class RelayProcess:
    """`outbox-relay run` via `start_relay_process`, with its output read continuously (a full
    pipe would block the relay's logging, and so the relay)."""

    def __init__(
        self,
        *,
        database_url: str,
        amqp_url: str,
        schema: str,
        exchange: str,
        name: str,
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.started_at = time.monotonic()
        self.process = start_relay_process(
            database_url=database_url,
            amqp_url=amqp_url,
            schema=schema,
            exchange=exchange,
            name=name,
            extra=extra,
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name=f"output-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def assert_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"relay {self.name} exited on its own ({code}):\n{self.output[-3000:]}"

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.process.poll() is None:
            self.process.kill()
        self._finish(10.0)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (graceful drain); returns the exit code. SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused relay cannot drain
            # A relay restarted a moment ago may still be loading Python: a SIGTERM before
            # the CLI runs meets no handler at all. Stop what is running, as an operator does.
            self._wait_for_start(timeout)
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._finish(10.0)
        return self.process.returncode

    def _wait_for_start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (
            "starting:" not in self.output
            and self.process.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)

    def _finish(self, timeout: float) -> None:
        self.process.wait(timeout)
        self._reader.join(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()


# -- database sessions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KilledSession:
    pid: int
    application_name: str
    state: str
    query: str

    @property
    def busy(self) -> bool:
        """Killed inside a statement or a transaction."""
        return self.state in ("active", "idle in transaction")


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def terminate_relay_sessions(
    engine: sa.Engine, relay_name: str, *, busy_only: bool = False
) -> list[KilledSession]:
    """pg_terminate_backend on the relay's sessions (application_name `outbox-relay:<name>...`).
    With `busy_only`, only those inside a statement or a transaction."""
    busy = "AND state IN ('active', 'idle in transaction')" if busy_only else ""
    statement = sa.text(
        "SELECT pid, application_name, coalesce(state, ''), coalesce(left(query, 200), ''), "
        "pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name LIKE :pattern AND pid <> pg_backend_pid() {busy}"
    )
    with engine.begin() as conn:
        rows = conn.execute(statement, {"pattern": _like_prefix(f"outbox-relay:{relay_name}")})
        return [KilledSession(r[0], r[1], r[2], r[3]) for r in rows if r[4]]


def describe_sessions(engine: sa.Engine, relay_name: str) -> str:
    """The relay's sessions as pg_stat_activity shows them (state, what they wait for, query):
    evidence for a relay that makes no progress."""
    statement = sa.text(
        "SELECT application_name, state, wait_event_type, wait_event, "
        "now() - query_start, left(query, 120) FROM pg_stat_activity "
        "WHERE application_name LIKE :pattern ORDER BY application_name"
    )
    with engine.connect() as conn:
        rows = conn.execute(statement, {"pattern": _like_prefix(f"outbox-relay:{relay_name}")})
        return "\n".join(
            f"  {r[0]}: {r[1]}, waiting for {r[2]}/{r[3]} for {r[4]}: {r[5]!r}" for r in rows
        )


def terminate_busy_session(
    engine: sa.Engine, relay_name: str, *, within: float = 2.0
) -> list[KilledSession]:
    """Kill the relay's sessions the moment one is mid-statement or mid-transaction (a claim or
    a result update); if none is within `within` seconds, kill whatever sessions it has."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        killed = terminate_relay_sessions(engine, relay_name, busy_only=True)
        if killed:
            return killed + terminate_relay_sessions(engine, relay_name)
        time.sleep(0.005)  # polling pg_stat_activity: there is nothing to wait on
    return terminate_relay_sessions(engine, relay_name)


# -- holding the relay at a chosen point ----------------------------------------------------------


class HoldPoint:
    """Stop the thread that reaches an SQLAlchemy event of an engine (the relay's database
    thread) until the test has applied a fault, so that the fault hits a chosen moment instead
    of a random one. The held thread is stalled exactly as a paused process would be there.

    `"commit"` (a connection event): a transaction's statements are done (its locks are held)
    and its COMMIT is about to be sent. `"checkin"` (a pool event): a transaction has just
    returned its connection. `within`: only when a function of that name is on the stack
    (e.g. "claim"). `max_hold`: the thread goes on after that long whatever the test does.
    """

    def __init__(
        self, engine: sa.Engine, event: str, *, within: str | None = None, max_hold: float = 10.0
    ) -> None:
        self._setup(engine, event, within=within, max_hold=max_hold)
        sa.event.listen(engine, event, self._hook)

    def _setup(self, engine: sa.Engine, event: str, *, within: str | None, max_hold: float) -> None:
        self.engine = engine
        self.event = event
        self.within = within
        self.max_hold = max_hold
        self._lock = threading.Lock()
        self._armed = False
        self._reached = threading.Event()
        self._go = threading.Event()
        self.held_pid: int | None = None  # the server process of the held connection

    @classmethod
    def before_statement(
        cls, store: Store, *, within: str | None = None, max_hold: float = 10.0
    ) -> HoldPoint:
        """Hold the thread about to send a statement of `store` (through SQLAlchemy or on
        the store's driver path, which SQLAlchemy's cursor events do not see)."""
        hold = cls.__new__(cls)
        hold._setup(store.engine, "statement", within=within, max_hold=max_hold)
        store.statement_observers.append(hold._hook)
        return hold

    def _hook(self, *args: object) -> None:
        if not self._armed or (self.within is not None and not _on_stack(self.within)):
            return
        with self._lock:
            if not self._armed:
                return
            self._armed = False
        self.held_pid = _backend_pid(args[0]) if args else None
        self._reached.set()
        self._go.wait(self.max_hold)  # bounded: a test that never releases must not hang it

    def arm(self) -> None:
        """Hold the next thread that reaches the point."""
        self._go.clear()
        self._reached.clear()
        self._armed = True

    def wait_held(self, timeout: float = 10.0) -> None:
        """Block until an armed point was reached; the thread stays held until `release()`."""
        if not self._reached.wait(timeout):
            self._armed = False
            # Not an AssertionError: the test's set-up no longer matches the relay's code.
            raise RuntimeError(f"no thread reached {self.event!r} within {timeout} s")

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        """Disarm and release. The listener stays registered (disarmed, it does nothing):
        removing it while the relay's thread dispatches the event would break that thread."""
        self._armed = False
        self._go.set()


def _backend_pid(conn: object) -> int | None:
    """The PostgreSQL backend pid of an SQLAlchemy Connection (the first argument of both
    connection events and pool events) or of a psycopg connection, if it has one."""
    dbapi = getattr(getattr(conn, "connection", None), "dbapi_connection", None)
    if dbapi is None:  # a pool event passes the DBAPI connection itself
        dbapi = conn
    info = getattr(dbapi, "info", None)
    pid = getattr(info, "backend_pid", None)
    return pid if isinstance(pid, int) else None


def _on_stack(function: str) -> bool:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


class CallGate:
    """Hold the first call of `obj.name` (a store's result write, say) after `arm()` until the
    test releases it: the caller is stalled exactly as a paused process would be there.

    The gate sits in front of the method, at the product's interface, so nothing of the call
    has run yet while it is held (no connection taken, no deadline started). `args` are the
    held call's arguments; `wait_done` waits for that call to return.
    """

    def __init__(self, obj: object, name: str, *, max_hold: float = 30.0) -> None:
        self.name = name
        self.max_hold = max_hold
        self.args: tuple[object, ...] = ()
        self.kwargs: dict[str, object] = {}
        self.result: object = None
        self._armed = False
        self._lock = threading.Lock()
        self._reached = threading.Event()
        self._go = threading.Event()
        self._done = threading.Event()
        real = getattr(obj, name)

        def gated(*args: object, **kwargs: object) -> object:
            with self._lock:
                held, self._armed = self._armed, False
            if not held:
                return real(*args, **kwargs)
            self.args, self.kwargs = args, kwargs
            self._reached.set()
            self._go.wait(self.max_hold)  # bounded: a test that never releases must not hang
            try:
                self.result = real(*args, **kwargs)
                return self.result
            finally:
                self._done.set()

        setattr(obj, name, gated)

    def arm(self) -> None:
        self._reached.clear()
        self._go.clear()
        self._done.clear()
        self._armed = True

    def wait_held(self, timeout: float = 10.0) -> None:
        if not self._reached.wait(timeout):
            raise RuntimeError(f"no call of {self.name} reached the gate within {timeout} s")

    def release(self) -> None:
        self._go.set()

    def wait_done(self, timeout: float = 10.0) -> None:
        if not self._done.wait(timeout):
            raise RuntimeError(f"the held call of {self.name} did not return within {timeout} s")

    def close(self) -> None:
        self._armed = False
        self._go.set()
