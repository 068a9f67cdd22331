"""LISTEN for the outbox's NOTIFY so the relay wakes at commit instead of at its next poll.

A notification is a hint, never the only way: nothing is delivered while the listener is
disconnected, so after every (re)connection the listener wakes the relay once to look.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
import sqlalchemy as sa
from psycopg import sql

from relay.backoff import backoff_delay
from relay.urls import mask_text

log = logging.getLogger("relay.listener")


def psycopg_dsn(database_url: str) -> str:
    """A libpq URL for psycopg from a SQLAlchemy URL."""
    url = sa.make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class Listener:
    def __init__(
        self,
        database_url: str,
        channel: str,
        wake: Callable[[], None],
        *,
        application_name: str,
        check_every: float = 0.25,
    ) -> None:
        self._dsn = psycopg_dsn(database_url)
        self._channel = channel
        self._wake = wake
        self._application_name = application_name[:63]
        self._check_every = check_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)
        self.notifications_total = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    application_name=self._application_name,
                    connect_timeout=5,
                ) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    failures = 0
                    self._wake()  # whatever was committed while we were not listening
                    while not self._stop.is_set():
                        # The timeout bounds how long stop() waits and how soon a dead
                        # connection is noticed.
                        for _ in conn.notifies(timeout=self._check_every, stop_after=1):
                            self.notifications_total += 1
                            self._wake()
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning(
                        "listener connection lost (%s); polling covers the gap",
                        mask_text(str(exc)).strip(),
                    )
            self._stop.wait(backoff_delay(failures, initial=0.5, maximum=10.0))
