"""One relay at a time on a SQLite database: an exclusive lock on a file beside it.

Why this holds: on SQLite the claim takes no lock that outlives its transaction (PostgreSQL's
claims serialise on an advisory lock and lease rows; SQLite has neither), so two relays on one
file would claim the same rows. `run` therefore takes `flock(LOCK_EX | LOCK_NB)` on
`<database>.relay-lock` before it builds the relay and keeps it until the relay has stopped.
A second relay's `flock` fails at once and it exits 7, naming the holder's pid. The kernel
releases the lock when the holder's file is closed, including when the process is killed
(SIGKILL too), so a crashed relay never leaves a stale lock behind: the next one starts.
The lock concerns relays only; the application's own connections never look at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from relay.errors import RelayError

LOCK_SUFFIX = ".relay-lock"


class DatabaseLockedError(RelayError):
    """Another relay holds the SQLite database: SQLite allows one relay at a time."""


def lock_path(database_url: str) -> Path | None:
    """The lock file of a SQLite database file; None for other databases and in-memory ones."""
    url = sa.make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    database = Path(url.database).expanduser().resolve()
    return database.with_name(database.name + LOCK_SUFFIX)


@contextlib.contextmanager
def single_relay(database_url: str) -> Iterator[Path | None]:
    """Hold the relay lock of a SQLite database for the duration; no-op for PostgreSQL."""
    path = lock_path(database_url)
    if path is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RelayError(
            f"cannot create the relay lock file {path} ({exc.strerror}): the relay needs "
            "write access to the directory of the SQLite database"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DatabaseLockedError(
                f"another relay (pid {holder}) is running on the SQLite database "
                f"{path.with_name(path.name.removesuffix(LOCK_SUFFIX))}: SQLite allows one "
                "relay at a time. Stop that relay first, or use PostgreSQL to run several"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
