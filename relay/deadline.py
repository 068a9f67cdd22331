"""A deadline around database calls.

psycopg waits forever on a blackholed link (bytes vanish, no reset), even with TCP keepalives
and tcp_user_timeout (../shared/RELIABILITY.md). A watchdog thread shuts the socket down when a
call overruns: the blocked read then fails at once, psycopg raises OperationalError and
SQLAlchemy discards the connection. `shutdown()` wakes a read blocked in another thread, which
`close()` would not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("relay.deadline")


#: The longest the watchdog sleeps. A guard due after its next wake-up needs no wake-up of
#: its own: woken once a second at most, the watchdog goes back to sleep until the earliest
#: deadline, so a guard is still enforced at its deadline, and a database call (several per
#: event) does not wake a thread.
LONGEST_SLEEP = 1.0


class Guard:
    """What the watchdog did to one guarded block (read once the block is over)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class Watchdog:
    def __init__(self, name: str = "db-watchdog") -> None:
        self._lock = threading.Condition()
        # guard id -> (deadline, fd, what to do first at the deadline, how long after it the
        # socket is shut down all the same, and the guard's state)
        self._armed: dict[int, tuple[float, int, Callable[[], None] | None, float, Guard]] = {}
        self._next_id = 0
        self._stopped = False
        self._wakes_at = 0.0  # when the watchdog next looks, at the latest
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(
        self,
        fd: int,
        seconds: float,
        *,
        cancel: Callable[[], None] | None = None,
        grace: float = 0.0,
    ) -> Iterator[Guard]:
        """Shut socket `fd` down if the block takes longer than `seconds`. With `cancel`:
        at `seconds`, `cancel()` first (on a thread of its own: the server's cancel request
        ends the statement, and the transaction is rolled back, which a shut socket does
        not do: the server goes on and may commit), and the socket is shut down only if
        the block still runs `grace` seconds later (the link is dead: no cancel arrives).
        The guard says, once the block is over, whether its cancel was asked for: a cancel
        that comes after the call ended would end the connection's next statement."""
        deadline = time.monotonic() + seconds
        state = Guard()
        with self._lock:
            self._next_id += 1
            guard_id = self._next_id
            self._armed[guard_id] = (deadline, fd, cancel, grace, state)
            if deadline < self._wakes_at:
                self._lock.notify()
        try:
            yield state
        finally:
            with self._lock:  # after this, the watchdog neither cancels nor shuts it down
                self._armed.pop(guard_id, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(2)

    def _run(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                for guard_id, (deadline, fd, cancel, grace, state) in list(self._armed.items()):
                    if deadline > now:
                        continue
                    if cancel is not None:
                        state.cancelled = True
                        self._armed[guard_id] = (now + grace, fd, None, 0.0, state)
                        threading.Thread(
                            target=_cancel, args=(cancel,), name="db-cancel", daemon=True
                        ).start()
                    else:
                        del self._armed[guard_id]
                        _shutdown(fd)
                earliest = min(
                    (armed[0] for armed in self._armed.values()), default=now + LONGEST_SLEEP
                )
                wait = max(min(earliest, now + LONGEST_SLEEP) - now, 0.01)
                self._wakes_at = now + wait
                self._lock.wait(timeout=wait)


def _cancel(cancel: Callable[[], None]) -> None:
    log.info("database call overran its deadline: cancelling it")
    try:
        cancel()
    except Exception as exc:  # the socket is shut down at the end of the grace all the same
        log.warning("could not cancel a database call (%s)", exc)


def _shutdown(fd: int) -> None:
    log.warning("database call overran its deadline: dropping the connection")
    try:
        dup = os.dup(fd)
    except OSError:
        return  # already closed
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        # Closed and its number reused by something else than a socket (a file): nothing to
        # shut down. Raised here, it ended the watchdog, and every deadline after it.
        os.close(dup)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
