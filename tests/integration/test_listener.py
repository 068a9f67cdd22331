"""The LISTEN connection read on the relay's loop (relay/listener.py): notifications wake the
relay on the loop's thread, the ping goes over the loop too, a dropped session is remade, and
the loop never watches a socket the listener's thread closes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import Outbox
from relay.listener import Listener
from tests.support.loops import running_loop, started_listener, wait_for
from tests.support.rabbit import unique_name

WAIT = 10.0


class Wakes:
    """Each wake-up, with the thread it came on."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def __call__(self) -> None:
        self.threads.append(threading.get_ident())


def notify(engine: sa.Engine, channel: str, times: int = 1) -> None:
    with engine.begin() as conn:
        for n in range(times):  # payloads apart: the server folds equal ones of a transaction
            conn.execute(
                sa.text("SELECT pg_notify(:channel, :payload)"),
                {"channel": channel, "payload": str(n)},
            )


def listener_sessions(engine: sa.Engine, name: str) -> list[sa.Row[tuple[int, str, str]]]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = :n"
                ),
                {"n": name},
            )
        )


@pytest.fixture
def name() -> str:
    return unique_name("outbox-relay:test-listen")


@pytest.fixture
def on_loop(
    pg_url: str, outbox_schema: Outbox, name: str
) -> Iterator[tuple[Listener, Wakes, asyncio.AbstractEventLoop, threading.Thread]]:
    wakes = Wakes()
    with running_loop() as loop:
        loop_thread: list[threading.Thread] = []
        loop.call_soon_threadsafe(lambda: loop_thread.append(threading.current_thread()))
        listener = started_listener(
            loop, pg_url, outbox_schema, name, wakes, ping_every=0.1, ping_timeout=2.0
        )
        try:
            wait_for(lambda: listener.connections_total == 1 and bool(loop_thread), "LISTEN")
            yield listener, wakes, loop, loop_thread[0]
        finally:
            listener.stop()


def test_notifications_wake_the_relay_on_the_loops_thread_once_per_read(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    on_loop: tuple[Listener, Wakes, object, threading.Thread],
) -> None:
    listener, wakes, _, loop_thread = on_loop
    wait_for(lambda: len(wakes.threads) >= 1, "the wake-up after LISTEN")
    after_listen = len(wakes.threads)
    notify(pg_engine, outbox_schema.channel, times=3)  # one transaction: delivered together
    wait_for(lambda: listener.notifications_total == 3, "three notifications")
    woken_by_them = wakes.threads[after_listen:]
    assert woken_by_them and set(woken_by_them) == {loop_thread.ident}
    assert len(woken_by_them) <= 3


def test_the_ping_goes_over_the_loop_and_keeps_the_one_connection(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    name: str,
    on_loop: tuple[Listener, Wakes, object, threading.Thread],
) -> None:
    """Pings every 0.1 s, answered on the loop: the session's last statement becomes the
    ping, no second connection is made, and notifications still arrive between pings."""
    listener, _, _, _ = on_loop
    wait_for(
        lambda: [r.query for r in listener_sessions(pg_engine, name)] == ["SELECT 1"],
        "a ping on the LISTEN session",
    )
    time.sleep(0.5)  # several pings
    before = listener.notifications_total
    notify(pg_engine, outbox_schema.channel)
    wait_for(lambda: listener.notifications_total > before, "a notification between pings")
    assert listener.connections_total == 1
    assert len(listener_sessions(pg_engine, name)) == 1


def test_a_terminated_session_is_remade_and_notifications_resume(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    name: str,
    on_loop: tuple[Listener, Wakes, object, threading.Thread],
) -> None:
    """The server ends the session: the loop's read fails at once, the thread makes a new
    connection (with the wake-up that follows every one), and a commit wakes the relay again."""
    listener, wakes, _, _ = on_loop
    (session,) = listener_sessions(pg_engine, name)
    with pg_engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session.pid})
    woken = len(wakes.threads)
    wait_for(lambda: listener.connections_total == 2, "a second LISTEN connection")
    wait_for(lambda: len(wakes.threads) > woken, "the wake-up after the new LISTEN")
    before = listener.notifications_total
    notify(pg_engine, outbox_schema.channel)
    wait_for(lambda: listener.notifications_total > before, "a notification on the new session")
    assert [r.pid for r in listener_sessions(pg_engine, name)] != [session.pid]


def _watched(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    selector = loop._selector  # type: ignore[attr-defined]
    return fd in selector.get_map()


def test_a_stop_on_the_loops_thread_between_its_runs_takes_the_socket_back_at_once(
    pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """The relay's shutdown: its thread, which runs the loop, stops the listener while the
    loop is not running. The socket is no longer watched, the thread ends, nothing waits
    for a loop that will not run again."""
    loop = asyncio.new_event_loop()
    try:
        listener = started_listener(loop, pg_url, outbox_schema, name)
        loop.run_until_complete(asyncio.sleep(0.05))  # the loop starts watching the socket
        watch = listener._watch
        assert watch is not None and _watched(loop, watch.fd)
        started = time.monotonic()
        listener.stop()
        assert time.monotonic() - started < 2.0
        assert not _watched(loop, watch.fd)
        assert not listener._thread.is_alive()
    finally:
        loop.close()


def test_a_stop_before_the_loop_came_to_the_socket_never_lets_it_watch_a_closed_one(
    pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """The hand-over is queued on a loop that has not run since (the relay's thread in its
    step) when the stop comes: the socket is closed by the thread, and when the loop runs
    next it does not start watching it (a closed descriptor, reused by the next socket)."""
    loop = asyncio.new_event_loop()
    try:
        listener = started_listener(loop, pg_url, outbox_schema, name)
        watch = listener._watch
        assert watch is not None
        listener.stop()
        assert not listener._thread.is_alive()
        # The kernel gives the lowest free descriptor: a new socket takes the closed one's.
        sockets = [socket.socket()]
        while sockets[-1].fileno() < watch.fd:
            sockets.append(socket.socket())
        watched: list[int] = []
        add_reader = loop.add_reader

        def recorded(fd: int, *args: Any) -> None:
            watched.append(fd)
            add_reader(fd, *args)

        loop.add_reader = recorded  # type: ignore[method-assign,assignment]
        try:
            loop.run_until_complete(asyncio.sleep(0.05))  # the queued hand-over runs now
            assert watched == [], "the loop watched the closed socket's descriptor"
            assert not _watched(loop, watch.fd), "the loop watches another socket"
            assert watch.ended.is_set() and not watch.watching
        finally:
            for sock in sockets:
                sock.close()
    finally:
        loop.close()


def _run_for(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_a_notify_right_behind_the_pings_answer_wakes_the_relay(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """The ping's answer and a commit's NOTIFY come in one read: the NOTIFY is parsed while
    the answer is (found by review: it was left in libpq's list, unread until the socket
    was readable again, up to a ping interval later)."""
    loop = asyncio.new_event_loop()
    wakes = Wakes()
    listener = started_listener(loop, pg_url, outbox_schema, name, wakes, ping_every=1000)
    try:
        _run_for(loop, 0.1)  # the loop watches the socket
        watch = listener._watch
        assert watch is not None and watch.watching
        loop.call_soon(listener._send_ping, watch)  # what the thread asks for every ping_every
        loop.call_soon(loop.stop)
        loop.run_forever()  # one round: the ping is sent, its answer not yet read
        assert watch.ping_deadline is not None
        time.sleep(0.2)  # the relay's step: the answer arrives, then the NOTIFY
        notify(pg_engine, outbox_schema.channel)
        time.sleep(0.2)
        woken = len(wakes.threads)
        _run_for(loop, 0.5)
        assert watch.ping_deadline is None and not watch.ended.is_set(), "answered"
        assert listener.notifications_total == 1
        assert len(wakes.threads) == woken + 1
    finally:
        listener.stop()
        loop.close()


def test_a_loop_that_does_not_run_past_the_ping_deadline_keeps_a_healthy_connection(
    pg_url: str, outbox_schema: Outbox, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's step runs longer than the ping's deadline: the ping has not even gone out,
    which says nothing of the link (found by review: the listener gave a healthy
    connection up and made another)."""
    loop = asyncio.new_event_loop()
    listener = started_listener(loop, pg_url, outbox_schema, name, ping_every=0.1, ping_timeout=0.3)
    try:
        _run_for(loop, 0.2)
        time.sleep(1.0)  # the loop does not run
        _run_for(loop, 0.5)  # pings go out, and are answered
        assert listener.connections_total == 1
        assert not [r for r in caplog.records if "listener connection lost" in r.getMessage()]
    finally:
        listener.stop()
        loop.close()


def _one_round(loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon(loop.stop)
    loop.run_forever()


def test_a_pings_answer_waiting_unread_through_a_long_step_keeps_the_connection(
    pg_url: str, outbox_schema: Outbox, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop sends the ping and its round ends before the answer comes; the relay's step
    then runs past the ping's deadline. When the loop runs again it reads the answer before
    it looks at the deadline (found by review: the thread's own deadline gave a healthy
    connection up)."""
    loop = asyncio.new_event_loop()
    listener = started_listener(
        loop, pg_url, outbox_schema, name, ping_every=0.05, ping_timeout=0.5
    )
    try:
        _run_for(loop, 0.02)
        watch = listener._watch
        assert watch is not None
        deadline = time.monotonic() + WAIT
        while watch.ping_deadline is None:  # the relay's takes: one short round each
            assert time.monotonic() < deadline, "no ping sent"
            _one_round(loop)
            time.sleep(0.001)
        time.sleep(1.0)  # a step past the deadline; the answer waits in the socket
        _one_round(loop)
        assert not watch.ended.is_set() and watch.ping_deadline is None
        _run_for(loop, 0.3)
        assert listener.connections_total == 1
        assert not [r for r in caplog.records if "listener connection lost" in r.getMessage()]
    finally:
        listener.stop()
        loop.close()


def test_a_connection_failing_as_the_thread_asks_for_a_ping_is_remade(
    pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """The thread's wait for the next ping ends, and before it asks for the ping the loop
    finds the connection failed (found by review: the thread then waited, for good, for a
    ping the ended watch never sent, and never listened again)."""
    with running_loop() as loop:
        listener = started_listener(
            loop, pg_url, outbox_schema, name, ping_every=0.05, ping_timeout=5.0
        )

        class FailsAsTheWaitEnds(threading.Event):
            """The watch's `ended`: its first timed-out wait returns only once the loop has
            ended the watch on a connection failure."""

            fired = False

            def wait(self, timeout: float | None = None) -> bool:
                answer = super().wait(timeout)
                if not answer and not self.fired:
                    self.fired = True
                    ended = threading.Event()

                    def fail() -> None:
                        assert watch is not None
                        watch.failure = OSError("connection reset (test)")
                        listener._unwatch(watch)
                        ended.set()

                    loop.call_soon_threadsafe(fail)
                    ended.wait(5)
                return answer

        try:
            watch = listener._watch
            assert watch is not None
            watch.ended = FailsAsTheWaitEnds()
            wait_for(lambda: listener.connections_total == 2, "a new LISTEN connection")
            assert watch.ended.fired
        finally:
            listener.stop()


def test_a_listener_whose_loop_is_closed_ends_and_closes_its_session(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """The relay's loop is closed without the listener being stopped (a shutdown that
    failed half-way): the listener's thread ends and closes its session, rather than
    reconnecting for good to a loop that is gone (found by review)."""
    loop = asyncio.new_event_loop()
    listener = started_listener(loop, pg_url, outbox_schema, name, ping_every=0.05)
    try:
        wait_for(lambda: listener._watch is not None, "the hand-over to the loop")
        loop.close()
        listener._thread.join(5)
        assert not listener._thread.is_alive()
        wait_for(lambda: listener_sessions(pg_engine, name) == [], "its session closed")
        assert listener.connections_total == 1
    finally:
        listener.stop()


def test_a_stop_from_another_thread_between_the_loops_runs_leaves_the_loop_its_own_work(
    pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """The loop watches the socket and is between two runs (the relay's step) when another
    thread stops the listener: the socket is taken back on the loop's thread, at its next
    run, not on the stopping thread, which would race the loop's own next round (found by
    review)."""
    loop = asyncio.new_event_loop()
    listener = started_listener(loop, pg_url, outbox_schema, name)
    ran_on: list[int] = []
    unwatch = listener._unwatch

    def recorded(watch: Any) -> None:
        ran_on.append(threading.get_ident())
        unwatch(watch)

    listener._unwatch = recorded  # type: ignore[method-assign]
    try:
        _run_for(loop, 0.1)
        watch = listener._watch
        assert watch is not None and watch.watching
        stopper = threading.Thread(target=listener.stop, kwargs={"timeout": 5.0})
        stopper.start()
        while stopper.is_alive():
            _run_for(loop, 0.02)
        assert ran_on == [threading.get_ident()], "taken back off the loop's thread"
        assert watch.ended.is_set() and not _watched(loop, watch.fd)
    finally:
        listener.stop()
        loop.close()


class RecordedBackoff(threading.Event):
    """The listener's stop event: each wait between connections is recorded, not waited."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.delays.append(timeout)
        return super().wait(0.001)


def test_a_connection_failing_right_after_listen_every_time_backs_off_until_one_proves_itself(
    pg_url: str, outbox_schema: Outbox, name: str
) -> None:
    """Each connection LISTENs and then fails before its first ping (found in review: the
    backoff started over at every LISTEN, so such a link was remade every half second for
    good). The waits grow as for any outage; a connection that answers a ping starts the
    backoff over."""
    with running_loop() as loop:
        listener = Listener(
            pg_url,
            outbox_schema.channel,
            lambda: None,
            loop=loop,
            application_name=name,
            ping_every=0.05,
            ping_timeout=5.0,
        )
        backoff = listener._stop = RecordedBackoff()
        listen_on_loop = listener._listen_on_loop
        flaps = 4

        def fails_until_the_last_flap(watch: Any) -> None:
            if listener.connections_total <= flaps:
                raise OSError("connection reset right after LISTEN (test)")

            def fail_once_proven() -> None:
                if watch.proven:
                    watch.failure = OSError("connection reset after a ping (test)")
                    listener._unwatch(watch)
                else:
                    loop.call_later(0.01, fail_once_proven)

            loop.call_soon_threadsafe(fail_once_proven)
            listen_on_loop(watch)

        listener._listen_on_loop = fails_until_the_last_flap  # type: ignore[method-assign]
        listener.start()
        try:
            wait_for(lambda: len(backoff.delays) > flaps, "a wait after the proven connection")
        finally:
            listener.stop()
    delays = backoff.delays
    # Equal jitter: attempt n waits between half and all of 0.5 s x 2^(n-1).
    assert 0.25 <= delays[0] <= 0.5, delays
    assert delays[flaps - 1] >= 0.5 * 2 ** (flaps - 1) / 2, delays
    assert 0.25 <= delays[flaps] <= 0.5, delays
