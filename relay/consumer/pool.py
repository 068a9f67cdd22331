"""`ConsumerPool`: several consumers of one group in threads of one process.

Each consumer has its own broker connection (pika connections belong to one thread), its own
processor and database session, and its own share of the group's queues, so that messages
of different queues are applied in parallel transactions while each queue keeps its order.
The first consumer also does the housekeeping (parked replays, inbox cleanup).
"""

from __future__ import annotations

import logging
import threading

from relay.consumer.runner import Consumer
from relay.errors import ConfigError

log = logging.getLogger("relay.consumer")


def share_queues(queues: int, threads: int) -> list[tuple[int, ...]]:
    """Queue indexes per thread, round robin: 4 queues over 2 threads -> (0, 2), (1, 3)."""
    if not 1 <= threads <= queues:
        raise ConfigError(
            f"threads must be between 1 and the number of queues ({queues}), got {threads}"
        )
    return [tuple(range(t, queues, threads)) for t in range(threads)]


class ConsumerPool:
    def __init__(self, consumers: list[Consumer]) -> None:
        if not consumers:
            raise ConfigError("a consumer pool needs at least one consumer")
        self.consumers = consumers
        self._errors: list[BaseException] = []

    def request_stop(self) -> None:
        """Each consumer finishes its message in hand, acks it and stops."""
        for consumer in self.consumers:
            consumer.request_stop()

    def run(self) -> None:
        """Run every consumer until `request_stop()`; the first error stops them all and is
        raised here."""
        threads = [
            threading.Thread(target=self._run_one, args=(c,), name=f"consumer-{i}", daemon=True)
            for i, c in enumerate(self.consumers)
        ]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            # Short joins: the main thread stays free to run signal handlers.
            for thread in threads:
                thread.join(0.2)
        if self._errors:
            raise self._errors[0]

    def _run_one(self, consumer: Consumer) -> None:
        try:
            # Connected in its own thread (a pika connection belongs to one). A broker that
            # cannot be reached or refuses the topology at start stops the pool (exit 4, 6);
            # later outages are reconnected.
            if not consumer.stopping:
                consumer.start()
            consumer.run()
        except BaseException as exc:
            log.error("consumer %s failed: %s", consumer.settings.name, exc)
            self._errors.append(exc)
            self.request_stop()
