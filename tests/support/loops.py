"""An asyncio loop running in a thread of its own, for what runs on the relay's loop, the
LISTEN listener started on a loop, and a wait for a condition those tests poll."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from outbox import Outbox
from relay.listener import Listener


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll `condition` until it holds; the seconds it took. AssertionError past `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


@contextlib.contextmanager
def running_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def started_listener(
    loop: asyncio.AbstractEventLoop,
    database_url: str,
    outbox: Outbox,
    name: str,
    wake: Callable[[], None] = lambda: None,
    **options: Any,
) -> Listener:
    """A listener on `loop`, started, once its thread has handed the connection over."""
    listener = Listener(
        database_url, outbox.channel, wake, loop=loop, application_name=name, **options
    )
    listener.start()
    try:
        wait_for(lambda: listener._watch is not None, "the hand-over to the loop")
    except AssertionError:
        listener.stop()
        raise
    return listener
