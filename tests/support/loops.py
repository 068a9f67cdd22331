"""An asyncio loop running in a thread of its own, for what runs on the relay's loop, and
the LISTEN listener started on a loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from outbox import Outbox
from relay.listener import Listener


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
    deadline = time.monotonic() + 10
    while listener._watch is None:
        if time.monotonic() > deadline:
            listener.stop()
            raise AssertionError("the listener did not hand its connection over in 10 s")
        time.sleep(0.01)
    return listener
