"""Database work off the relay loop's thread.

The relay loop must keep taking confirms and handing out the next event of each key while a
claim or a batch of result writes is on its way to the database; otherwise every round trip
stalls the whole pipeline. A worker runs its jobs one at a time, in submission order, on one
thread; each job's completion is handed back to the loop through `post`, and runs there. (The
relay has two: one for claims, one for everything else; see `relay.relay`.)
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("relay.worker")

Done = Callable[[Any, BaseException | None], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """A finished job: the loop calls `done(result, error)`."""

    done: Done
    result: Any
    error: BaseException | None

    def deliver(self) -> None:
        self.done(self.result, self.error)


class Worker(Protocol):
    def submit(self, job: Callable[[], Any], done: Done) -> None: ...

    def stop(self, timeout: float) -> None: ...


class InlineWorker:
    """Runs each job at once in the caller's thread: deterministic steps for unit tests."""

    def submit(self, job: Callable[[], Any], done: Done) -> None:
        try:
            result = job()
        except Exception as exc:
            done(None, exc)
        else:
            done(result, None)

    def stop(self, timeout: float) -> None:
        pass


class ThreadWorker:
    def __init__(self, post: Callable[[Completion], None], name: str = "relay-db") -> None:
        self._post = post
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any], done: Done) -> None:
        self._jobs.put((job, done))

    def stop(self, timeout: float) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                result = job()
            except Exception as exc:  # delivered to the loop, which decides what it means
                self._post(Completion(done, None, exc))
            else:
                self._post(Completion(done, result, None))
