"""The LISTEN connection on a link that goes silent: it notices, reconnects once the link
heals, and NOTIFY wake-ups resume (issue 12.6). Without its ping it would sit on the dead
connection forever and the relay would fall back to polling without a word."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.listener import Listener
from tests.faults.invariants import ScenarioResult
from tests.faults.proxy import FaultProxy
from tests.faults.runners import via_proxy_pg
from tests.support import loops
from tests.support.loops import running_loop
from tests.support.loops import started_listener as handed_over
from tests.support.relays import write_events

pytestmark = pytest.mark.slow

WAIT = 20.0


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self._condition = threading.Condition()

    def __call__(self) -> None:
        with self._condition:
            self.count += 1
            self._condition.notify_all()

    def wait_above(self, count: int, what: str) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: self.count > count, WAIT):
                raise AssertionError(f"timed out after {WAIT} s waiting for {what}")


def wait_for(condition: Callable[[], bool], what: str) -> float:
    return loops.wait_for(condition, what, timeout=WAIT)


@pytest.fixture
def listener_and_wakes(
    pg_url: str, pg_proxy: FaultProxy, outbox_schema: Outbox
) -> Iterator[tuple[Listener, Wakes]]:
    with started_listener(pg_url, pg_proxy, outbox_schema) as started:
        yield started


@contextlib.contextmanager
def started_listener(
    pg_url: str, pg_proxy: FaultProxy, outbox_schema: Outbox
) -> Iterator[tuple[Listener, Wakes]]:
    """A listener through the proxy, with a ping every 0.5 s that gives up after 1 s;
    stopped, and the proxy healed, afterwards."""
    wakes = Wakes()
    with running_loop() as loop:
        listener = Listener(
            via_proxy_pg(pg_url, pg_proxy),
            outbox_schema.channel,
            wakes,
            loop=loop,
            application_name="outbox-relay:test-listener",
            ping_every=0.5,
            ping_timeout=1.0,
            connect_timeout=2,
        )
        listener.start()
        try:
            yield listener, wakes
        finally:
            pg_proxy.heal()
            listener.stop()


def test_listen_connection_reconnects_after_a_blackhole_and_wakeups_resume(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    pg_proxy: FaultProxy,
    listener_and_wakes: tuple[Listener, Wakes],
    record_result: Callable[[ScenarioResult], None],
) -> None:
    """Given a listener woken by a commit, when its link is blackholed (bytes vanish, no
    reset), then it gives the silent connection up and tries a new one (its ping overran),
    and once the link heals it is listening again: a commit wakes it, without polling."""
    started = time.monotonic()
    listener, wakes = listener_and_wakes
    wait_for(lambda: listener.connections_total == 1, "the first LISTEN connection")
    before = listener.notifications_total
    write_events(pg_engine, outbox_schema, [Event(type="order.placed", key="k")])
    wait_for(lambda: listener.notifications_total > before, "a notification before the fault")

    accepted = pg_proxy.accepted_total
    pg_proxy.blackhole()
    blackholed_at = time.monotonic()
    # A new connect through the proxy means the listener gave up the silent connection.
    detected_s = wait_for(lambda: pg_proxy.accepted_total > accepted, "a reconnect attempt")
    assert listener.connections_total == 1  # nothing gets through the blackhole

    pg_proxy.heal()
    healed_at = time.monotonic()
    wakes_before = wakes.count
    wait_for(lambda: listener.connections_total == 2, "a LISTEN connection after the heal")
    reconnected_s = time.monotonic() - healed_at
    wakes.wait_above(wakes_before, "the wake-up that follows every reconnection")

    before = listener.notifications_total
    write_events(pg_engine, outbox_schema, [Event(type="order.placed", key="k")])
    wait_for(lambda: listener.notifications_total > before, "a notification after the heal")

    record_result(
        ScenarioResult(
            scenario="12.6 LISTEN link blackholed",
            events=2,
            delivered=2,
            lost=0,
            unexpected=0,
            duplicates=0,
            duplicates_allowed=0,
            reordered=0,
            recovery_s=reconnected_s,
            seconds=time.monotonic() - started,
            notes=f"dead link noticed in {detected_s:.2f}s "
            f"(ping every 0.5s, timeout 1s); blackholed {healed_at - blackholed_at:.1f}s",
        )
    )


def test_a_link_going_silent_right_before_listen_is_noticed_like_any_other(
    pg_url: str, pg_proxy: FaultProxy, outbox_schema: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link goes silent between the check of the connection's settings and its LISTEN:
    the LISTEN is bounded like the ping, so the listener gives that connection up and
    listens again once the link heals (found by review: it waited in the LISTEN for good,
    and the relay only polled from then on)."""
    import relay.listener

    real = relay.listener.arrived
    calls = {"n": 0}

    def then_silence(*args: object, **kwargs: object) -> bool:
        answer = real(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] == 1:
            pg_proxy.blackhole(True)
        return answer

    monkeypatch.setattr(relay.listener, "arrived", then_silence)
    with started_listener(pg_url, pg_proxy, outbox_schema) as (listener, _):
        wait_for(lambda: calls["n"] >= 1, "the first check")
        time.sleep(1.5)  # past the ping timeout: the LISTEN on the silent link gave up
        pg_proxy.heal()
        wait_for(lambda: listener.connections_total >= 1, "LISTEN on a healed link")
        assert calls["n"] >= 2, "a second connection after the silent one"


def _through_the_proxy(
    loop: asyncio.AbstractEventLoop,
    pg_url: str,
    pg_proxy: FaultProxy,
    outbox: Outbox,
    *,
    ping_timeout: float,
) -> Listener:
    """A listener on `loop` through the proxy, a ping every 0.2 s, handed over."""
    return handed_over(
        loop,
        via_proxy_pg(pg_url, pg_proxy),
        outbox,
        "outbox-relay:test-listener",
        ping_every=0.2,
        ping_timeout=ping_timeout,
        connect_timeout=2,
    )


def test_a_stop_while_a_ping_waits_on_a_silent_link_returns_at_once(
    pg_url: str, pg_proxy: FaultProxy, outbox_schema: Outbox
) -> None:
    """The link is silent and a ping waits for its answer (deadline 10 s) when the relay
    stops: the stop takes the connection back from the loop, and the thread waits for that
    ping no longer (it held the relay's shutdown for the listener's whole join timeout)."""
    with running_loop() as loop:
        listener = _through_the_proxy(loop, pg_url, pg_proxy, outbox_schema, ping_timeout=10.0)
        try:
            pg_proxy.blackhole()
            time.sleep(0.5)  # a ping went out into the silence
            started = time.monotonic()
            listener.stop(timeout=5.0)
            assert time.monotonic() - started < 2.0
            assert not listener._thread.is_alive()
        finally:
            pg_proxy.heal()
            listener.stop()


def test_a_ping_unanswered_while_the_loop_does_not_run_closes_nothing_the_loop_watches(
    pg_url: str, pg_proxy: FaultProxy, outbox_schema: Outbox
) -> None:
    """The ping went out into a silent link, and its deadline passes while the loop does not
    run (the relay's step): nothing is closed while the loop watches the socket (a
    descriptor closed while watched, then taken by the next connection, would confuse the
    loop's selector). Once the loop runs, the overdue ping ends the connection, and the
    listener listens again."""
    loop = asyncio.new_event_loop()
    listener = _through_the_proxy(loop, pg_url, pg_proxy, outbox_schema, ping_timeout=0.5)
    try:
        loop.run_until_complete(asyncio.sleep(0.1))
        watch = listener._watch
        assert watch is not None and watch.watching
        socket_id = os.fstat(watch.fd).st_ino
        pg_proxy.blackhole()
        while watch.ping_deadline is None:
            loop.run_until_complete(asyncio.sleep(0.05))  # a ping goes out into the silence
        time.sleep(1.5)  # past its deadline, the loop not running
        assert os.fstat(watch.fd).st_ino == socket_id, "closed while the loop watched it"
        pg_proxy.heal()
        deadline = time.monotonic() + WAIT
        while listener.connections_total < 2:
            assert time.monotonic() < deadline, "no LISTEN after the loop let the socket go"
            loop.run_until_complete(asyncio.sleep(0.05))
        assert watch.ended.is_set() and not watch.watching
    finally:
        pg_proxy.heal()
        listener.stop()
        loop.close()
