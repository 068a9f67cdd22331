"""Where the relay loop waits: what arrives for it (confirms, finished database jobs, wake-ups)
and, in the daemon, the one event loop that drives the broker connection too.

Two kinds, one interface (`put` from anywhere, `take` from the relay's thread):

* `QueueMailbox`: a plain queue. The publisher runs its own I/O thread and hands over every
  confirm; unit tests drive the relay with it and fakes, step by step.
* `LoopMailbox`: the relay's thread runs an asyncio loop while it waits, and the publisher's
  connection lives on that loop (pika's `AsyncioConnection`). A confirm is then read, turned
  into an outcome and handled in one thread, with no hand-off to another thread and no wait
  for the GIL between the broker's answer and the next publish of the key. Everything the
  loop runs (pika's callbacks) runs only inside `take`; the relay's own step runs between
  two `take`s, so the two never interleave and nothing needs a lock.

Why `take` always runs the loop at least once, even with items waiting: socket reads and
writes happen only while the loop runs, so a relay that always found something in its mailbox
would otherwise never send what it published or read the confirms it waits for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Mailbox(Protocol[T]):
    def put(self, item: T) -> None: ...

    def interrupt(self, item: T) -> None: ...

    def take(self, wait: float) -> list[T]: ...

    def close(self) -> None: ...


class QueueMailbox(Generic[T]):
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()

    def put(self, item: T) -> None:
        """Any thread, and signal handlers."""
        self._queue.put(item)

    def interrupt(self, item: T) -> None:
        """Like `put`: a blocked `take` wakes at once either way."""
        self._queue.put(item)

    def take(self, wait: float) -> list[T]:
        """Everything waiting; if nothing is, wait up to `wait` seconds for the first item."""
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        items = [first]
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        pass


class LoopMailbox(Generic[T]):
    """The mailbox of a relay whose thread also runs `loop` (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque[T] = collections.deque()  # append/popleft are atomic
        self._owner: int | None = None  # the thread that runs the loop (the relay's)

    def put(self, item: T) -> None:
        """Any thread. From a callback of the loop itself (a confirm), no system call: the
        loop is not blocked in `select`, so asking it to stop after this round is enough."""
        self._items.append(item)
        if self.loop.is_running() and threading.get_ident() == self._owner:
            self.loop.stop()
        else:
            self.interrupt_only()

    def interrupt(self, item: T) -> None:
        """For signal handlers (which run in the relay's thread, possibly while the loop is
        blocked in `select`, so only a write to its wake-up pipe ends the wait) and other
        threads."""
        self._items.append(item)
        self.interrupt_only()

    def interrupt_only(self) -> None:
        with contextlib.suppress(RuntimeError):  # closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.loop.stop)

    def take(self, wait: float) -> list[T]:
        """Run the loop until something arrives or `wait` seconds pass (at least one round
        of I/O, without blocking, when something is waiting already), then take it all."""
        self._owner = threading.get_ident()
        if self._items or wait <= 0:
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()
        else:
            timer = self.loop.call_later(wait, self.loop.stop)
            try:
                self.loop.run_forever()
            finally:
                timer.cancel()
        items: list[T] = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self) -> None:
        """After the last `take`: cancel what is left on the loop and close it.

        Not `run_until_complete`: a `loop.stop()` already queued (a worker's completion or a
        second SIGTERM after the last `take`) or called by a cancelled task's cleanup (its
        outcomes posted here) would make it raise "Event loop stopped before Future
        completed", and a graceful stop end in a traceback. Every stop only ends one round."""
        if self.loop.is_closed():
            return
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            finished = asyncio.gather(*pending, return_exceptions=True)
            finished.add_done_callback(lambda _: self.loop.stop())
            while not finished.done():
                self.loop.run_forever()
        self.loop.close()
