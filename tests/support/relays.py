"""Running relays in tests: in a thread of the test process, or as `outbox-relay` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import outbox
from outbox import Event, Outbox
from relay.app import build_relay
from relay.relay import Relay
from relay.settings import RelaySettings
from tests.support.history import Delivery, Written
from tests.support.rabbit import QueueTap

REPO = Path(__file__).resolve().parents[2]


def interleaved_events(count: int, keys: int, type_: str = "order.placed") -> list[Event]:
    return [Event(type=type_, key=f"k{i % keys}", payload={"i": i}) for i in range(count)]


def write_events(
    engine: sa.Engine, box: Outbox, events: Sequence[Event], per_transaction: int = 500
) -> None:
    for start in range(0, len(events), per_transaction):
        with engine.begin() as conn:
            outbox.write(conn, *events[start : start + per_transaction], outbox=box)


def written(engine: sa.Engine, box: Outbox) -> list[Written]:
    t = box.events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.id, t.c.key, t.c.seq).order_by(t.c.seq))
        return [Written(id=str(r.id), key=r.key, seq=r.seq) for r in rows]


def count_by_status(engine: sa.Engine, box: Outbox) -> dict[str, int]:
    """How many outbox rows are pending, published and dead."""
    t = box.events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status))
        return {status: count for status, count in rows}


def drain_distinct(tap: QueueTap, count: int, timeout: float) -> list[Delivery]:
    """Drain until `count` distinct message ids arrived: duplicates do not count towards it.

    `timeout` bounds the whole wait; each drain round gives up after 5 s without a message.
    """
    deadline = time.monotonic() + timeout
    deliveries = tap.drain(expected=count, timeout=5)
    while len({d.message_id for d in deliveries}) < count and time.monotonic() < deadline:
        missing = count - len({d.message_id for d in deliveries})
        deliveries = tap.drain(expected=len(deliveries) + missing, timeout=5)
    return deliveries


@contextlib.contextmanager
def relay_thread(
    settings: RelaySettings, *, steps: list[float] | None = None, **build: Any
) -> Iterator[Relay]:
    """A relay running in a thread (named `relay-<its name>`); stopped gracefully (and
    checked) on exit. With `steps`, the duration of each of its steps is kept there.

    `build`: keyword arguments of `build_relay()` (metrics, tracer_provider)."""
    relay = build_relay(settings, **build)
    if steps is not None:
        step = relay.run_once

        def timed(timeout: float | None = None) -> Any:
            started = time.monotonic()
            try:
                return step(timeout)
            finally:
                steps.append(time.monotonic() - started)

        relay.run_once = timed  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:  # surfaced in the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"relay-{settings.name}", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.request_stop()
        thread.join(30)
        relay.store.engine.dispose()
    assert not thread.is_alive(), "relay did not stop within 30 s"
    if errors:
        raise errors[0]


def relay_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings_env)
    env["PYTHONPATH"] = str(REPO)
    return env


def start_relay_process(
    *,
    database_url: str,
    amqp_url: str,
    schema: str,
    exchange: str,
    name: str,
    extra: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """`outbox-relay run` as a real process (its own signal handling, its own exit code)."""
    env = relay_env(
        {
            "OUTBOX_DATABASE_URL": database_url,
            "OUTBOX_AMQP_URL": amqp_url,
            "OUTBOX_SCHEMA": schema,
            "OUTBOX_EXCHANGE": exchange,
            "OUTBOX_RELAY_NAME": name,
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "run", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> tuple[int, str]:
    """SIGTERM, wait, return (exit code, output)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output.decode(errors="replace")
