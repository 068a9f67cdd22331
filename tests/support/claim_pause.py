"""Stopping a store's claim inside its transaction, on the server, until the test lets it go.

A claim on PostgreSQL is one script sent in one round trip (`Store._claim_postgres`), so the
client has no moment between its statements to stop at. `ClaimPause` adds a statement to
the next claim's script, after a chosen step, that waits for an advisory lock the test
holds: the claim's session then sits inside its transaction exactly there, its locks
taken, as a relay frozen at that point would.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

import sqlalchemy as sa

from relay.store import Store


class ClaimPause:
    """Hold the next claim of `store` after its step `after` ("lock": keys locked, events
    not yet read; "read": events read and leased, COMMIT not yet done) until `release()`,
    or `max_hold` seconds. The same calls as `tests.faults.runners.HoldPoint`."""

    def __init__(self, store: Store, *, after: str = "lock", max_hold: float = 20.0) -> None:
        self.store = store
        self.after = after
        self.max_hold = max_hold
        self.held_pid: int | None = None  # the server process of the held claim
        # Below 2**31: pg_locks shows it as objid, classid 0.
        self._key = random.randrange(1, 2**31)
        self._armed = False
        self._guard = threading.Lock()
        self._holder: sa.Connection | None = None
        # Sessions of its own, not named like the relay's: tests that end the relay's
        # sessions by name must not end the one that holds the lock.
        self._engine = sa.create_engine(
            store.engine.url,
            connect_args={"application_name": "claim-pause"},
            pool_size=2,
            max_overflow=0,
        )
        self._timer: threading.Timer | None = None
        real = store._claim_script

        def with_pause(read: Any) -> list[tuple[str, str]]:
            steps = real(read)
            with self._guard:
                if not self._armed:
                    return steps
                self._armed = False
            names = [name for name, _ in steps]
            if self.after not in names:
                raise RuntimeError(f"the claim's script has no step {self.after!r}: {names}")
            at = names.index(self.after) + 1
            return [
                *steps[:at],
                ("pause", f"SELECT pg_advisory_xact_lock({self._key})"),
                *steps[at:],
            ]

        store._claim_script = with_pause  # type: ignore[method-assign]

    def arm(self) -> None:
        """Hold the next claim that starts."""
        self._release_lock()
        self._holder = self._engine.connect()
        self._holder.exec_driver_sql(f"SELECT pg_advisory_lock({self._key})")
        self._holder.commit()
        self.held_pid = None
        self._timer = threading.Timer(self.max_hold, self._release_lock)
        self._timer.daemon = True
        self._timer.start()
        with self._guard:
            self._armed = True

    def wait_held(self, timeout: float = 10.0) -> None:
        """Block until a claim waits at the pause (its session is then `held_pid`)."""
        deadline = time.monotonic() + timeout
        query = sa.text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid = 0 AND objid = :key AND objsubid = 1"
        )
        with self._engine.connect() as conn:
            while time.monotonic() < deadline:
                pid = conn.execute(query, {"key": self._key}).scalar()
                conn.rollback()
                if pid is not None:
                    self.held_pid = int(pid)
                    return
                time.sleep(0.005)
        with self._guard:
            self._armed = False
        raise RuntimeError(f"no claim reached the pause after {self.after!r} within {timeout} s")

    def release(self) -> None:
        self._release_lock()

    def close(self) -> None:
        with self._guard:
            self._armed = False
        self._release_lock()
        self._engine.dispose()

    def _release_lock(self) -> None:
        with self._guard:
            timer, self._timer = self._timer, None
            holder, self._holder = self._holder, None
        if timer is not None:
            timer.cancel()
        if holder is not None:
            with contextlib.suppress(sa.exc.DBAPIError):  # a session that ended freed it
                holder.exec_driver_sql(f"SELECT pg_advisory_unlock({self._key})")
            holder.close()
