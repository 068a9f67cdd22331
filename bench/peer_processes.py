"""The `peer` benchmark's child processes: each relay in a process of its own, and the writers.

Every body here runs in a spawned child (its own interpreter, its own GIL) and talks to the
bench process through a pipe: "ready" once it can work, then its result, or the exception it
died of. Nothing imports txoutbox unless a txoutbox process runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType

import sqlalchemy as sa

from bench.common import EVENT_TYPE, create_engine, payload, run_relay_until_empty
from outbox import Event, Outbox
from relay.app import build_relay
from relay.settings import RelaySettings

OURS = "ours"
TXOUTBOX = "txoutbox"
KINDS = (OURS, TXOUTBOX)

READY_TIMEOUT = 30.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far, all its threads (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name, in parentheses, may hold spaces: fields count from after it.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _report_failure(pipe: Connection, exc: BaseException) -> None:
    try:
        pipe.send(exc)
    except Exception:  # an exception that does not pickle: its text does
        pipe.send(RuntimeError(f"{type(exc).__name__}: {exc}"))


# -- relays as daemons (latency runs) ---------------------------------------------------------


def our_relay(settings: RelaySettings, pipe: Connection, stop: EventType) -> None:
    """Our relay as `outbox-relay run` builds it (`relay.app.build_relay`), until `stop`."""
    _quiet_logs()
    try:
        relay = build_relay(settings)

        def announce() -> None:
            deadline = time.monotonic() + READY_TIMEOUT
            while not relay.publisher.ready and time.monotonic() < deadline:
                time.sleep(0.01)
            pipe.send("ready")
            stop.wait()
            relay.request_stop()

        threading.Thread(target=announce, name="bench-stop", daemon=True).start()
        relay.run()
        relay.store.engine.dispose()
        pipe.send("stopped")
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def txoutbox_relay(
    database_url: str,
    amqp_url: str,
    schema: str,
    channel: str,
    exchange: str,
    pipe: Connection,
    stop: EventType,
) -> None:
    """txoutbox's relay (see `bench.peer_txoutbox`), until `stop`."""
    _quiet_logs()
    try:
        from bench import peer_txoutbox

        async def main() -> None:
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()

            def set_stopping() -> None:
                loop.call_soon_threadsafe(stopping.set)

            _bridge(stop, set_stopping)
            await peer_txoutbox.run_relay(
                database_url,
                amqp_url,
                schema,
                channel,
                exchange,
                lambda: pipe.send("ready"),
                stopping,
                peer_txoutbox.PublishedClock(expected=None),
            )

        asyncio.run(main())
        pipe.send("stopped")
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def _bridge(stop: EventType, then: Callable[[], None]) -> None:
    """Call `then` (in a thread) once the bench process sets `stop`."""

    def wait() -> None:
        stop.wait()
        then()

    threading.Thread(target=wait, name="bench-stop", daemon=True).start()


# -- relays draining a backlog (throughput runs) ----------------------------------------------


def our_drain(settings: RelaySettings, pipe: Connection) -> None:
    """Our relay with `until_empty`, timed from its `run()` to the last confirm."""
    _quiet_logs()
    try:
        pipe.send(run_relay_until_empty(settings).as_dict())
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def txoutbox_drain(
    database_url: str,
    amqp_url: str,
    schema: str,
    channel: str,
    exchange: str,
    expected: int,
    pipe: Connection,
) -> None:
    """txoutbox's relay until `expected` messages are confirmed, timed the same way as ours:
    from the start (connecting included) to the last confirm, and the CPU over its run."""
    _quiet_logs()
    try:
        from bench import peer_txoutbox

        clock = peer_txoutbox.PublishedClock(expected=expected)

        async def main() -> None:
            # Never set: the clock stops the relay at the last confirm.
            await peer_txoutbox.run_relay(
                database_url,
                amqp_url,
                schema,
                channel,
                exchange,
                lambda: None,
                asyncio.Event(),
                clock,
            )

        cpu_before = time.process_time()
        started = time.perf_counter()
        asyncio.run(main())
        ended = time.perf_counter()
        cpu = time.process_time() - cpu_before
        last = clock.last_publish if clock.last_publish is not None else ended
        pipe.send(
            {
                "events": clock.published,
                "wall_seconds": round(ended - started, 4),
                "confirm_seconds": round(last - started, 4),
                "rate": round(clock.published / (last - started), 1) if last > started else 0.0,
                "cpu_seconds": round(cpu, 3),
                "cpu_us_per_event": round(cpu / clock.published * 1e6, 1)
                if clock.published
                else 0.0,
            }
        )
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


# -- writers ------------------------------------------------------------------------------------


def writer(
    kind: str,
    database_url: str,
    schema: str,
    channel: str,
    rate: int,
    index: int,
    shares: int,
    count: int,
    keys: int,
    body_size: int,
    pipe: Connection,
) -> None:
    """Events `index`, `index + shares`, ... of `count`, one per transaction, event j due at
    start + j / rate (open loop: a writer that fell behind catches up without sleeping),
    through each library's own producer call. Sends (event id, index, commit returned at,
    due at) for each, and this process's CPU over the writing."""
    _quiet_logs()
    try:
        pipe.send("ready")
        start_at = float(pipe.recv())
        due = [(j, start_at + j / rate) for j in range(index, count, shares)]
        cpu_before = own_cpu_seconds()
        if kind == OURS:
            records = _write_ours(database_url, schema, due, keys, body_size)
        else:
            from bench import peer_txoutbox

            records = asyncio.run(
                peer_txoutbox.write_paced(database_url, schema, channel, due, keys, body_size)
            )
        pipe.send({"records": records, "cpu_seconds": own_cpu_seconds() - cpu_before})
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def _write_ours(
    database_url: str, schema: str, due: list[tuple[int, float]], keys: int, body_size: int
) -> list[tuple[str, int, float, float]]:
    import outbox

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    box = Outbox(schema=schema)
    records: list[tuple[str, int, float, float]] = []
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        for i, due_at in due:
            delay = due_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event = Event(type=EVENT_TYPE, key=f"k{i % keys}", payload=payload(i, body_size))
            with engine.begin() as conn:
                outbox.write(conn, event, outbox=box)
            records.append((str(event.id), i, time.monotonic(), due_at))
    finally:
        engine.dispose()
    return records
