"""What one fault scenario works with: the relay's links through fault proxies, a tap on the
real broker, an observer of arrivals, and the report of the scenario's figures."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from outbox import Event, Outbox
from relay.relay import Relay
from relay.settings import RelaySettings
from tests.faults.invariants import ScenarioResult, wait_until_finished
from tests.faults.observe import Observer
from tests.faults.proxy import FaultProxy
from tests.faults.runners import RelayThread, via_proxy_amqp, via_proxy_pg
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import write_events, written

#: Relay settings for fault tests: short leases and timeouts so that faults resolve in seconds.
FAULT_SETTINGS: dict[str, Any] = {
    "lease": 3.0,
    "db_timeout": 2.0,
    "poll_interval": 0.2,
    "retry_min": 0.2,
    "retry_max": 1.0,
    "max_attempts": 5,
    "max_in_flight": 200,
    # Many small claims: faults hit claims often, and duplicate bounds stay tight.
    "batch_size": 100,
    "stop_timeout": 5.0,
}


@dataclasses.dataclass
class Rig:
    """Everything one fault scenario works with."""

    engine: sa.Engine  # direct to PostgreSQL: the application's writes and the test's checks
    box: Outbox
    pg_url: str  # direct
    amqp_url: str  # direct
    pg_proxy: FaultProxy
    amqp_proxy: FaultProxy
    tap: QueueTap
    exchange: str
    observer: Observer
    record: Callable[[ScenarioResult], None]
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def schema(self) -> str:
        assert self.box.schema is not None
        return self.box.schema

    def settings(self, **overrides: Any) -> RelaySettings:
        """Settings for an in-process relay whose links both go through the proxies."""
        values: dict[str, Any] = {
            "database_url": via_proxy_pg(self.pg_url, self.pg_proxy),
            "amqp_url": via_proxy_amqp(self.amqp_url, self.amqp_proxy),
            "schema": self.box.schema,
            "exchange": self.exchange,
            "name": unique_name("relay"),
            **FAULT_SETTINGS,
        }
        values.update(overrides)
        return RelaySettings(**values)

    def relay(self, settings: RelaySettings, relay: Relay | None = None) -> RelayThread:
        """An in-process relay (`relay`, or one built from `settings`); if it does not stop,
        the proxies are stopped to unstick it."""
        return RelayThread(settings, on_stuck=self.stop_proxies, relay=relay)

    def committed_ids(self) -> set[str]:
        return {w.id for w in written(self.engine, self.box)}

    def deliver_everything(self, assert_running: Callable[[], None], idle: float = 20.0) -> None:
        """With the relay still running: receive until every committed event arrived and every
        row is recorded (or nothing moved for `idle` seconds; `verify` then says what is
        missing), and check that the relay is still running."""
        self.observer.wait_for_ids(self.committed_ids(), idle_timeout=idle)
        wait_until_finished(self.engine, self.box, timeout=idle)
        assert_running()

    def probe_recovery(self, since: float, timeout: float) -> float | None:
        """Commit an event of a fresh key now; seconds from `since` until it arrives (None: not
        within `timeout`). For faults after which the relay may go on publishing what it
        already held, "the next delivery" proves nothing; this one needs a claim after the
        fault and a publish on a working connection."""
        probe = Event(type="order.probe", key=unique_name("probe"))
        # Committed on another thread while this one keeps stamping deliveries: stamps held
        # back by the commit would make what the relay sent before the fault look as if it
        # came after, and its redelivery look unexplained.
        failed: list[BaseException] = []

        def commit() -> None:
            try:
                write_events(self.engine, self.box, [probe])
            except BaseException as exc:  # raised again in the test thread
                failed.append(exc)

        writer = threading.Thread(target=commit, name="probe-writer", daemon=True)
        writer.start()
        try:
            return self.observer.seconds_until_delivered(str(probe.id), since, timeout)
        finally:
            writer.join(timeout)
            if failed:
                raise failed[0]

    def record_stuck(self, scenario: str, notes: str) -> None:
        """Record a scenario that could not finish (the relay stopped making progress)."""
        committed = self.committed_ids()
        seen = self.observer.seen()
        self.record(
            ScenarioResult(
                scenario=scenario,
                events=len(committed),
                delivered=self.observer.count,
                lost=len(committed - seen),
                unexpected=len(seen - committed),
                duplicates=self.observer.count - len(seen),
                duplicates_allowed=None,
                reordered=0,
                recovery_s=None,
                seconds=time.monotonic() - self.started,
                notes=f"{notes} (lost: not delivered when the test gave up)",
            )
        )

    def heal_all(self) -> None:
        for proxy in (self.pg_proxy, self.amqp_proxy):
            proxy.heal()

    def stop_proxies(self) -> None:
        """Close every proxied socket (unsticks a relay blocked on a silent link)."""
        for proxy in (self.pg_proxy, self.amqp_proxy):
            proxy.stop()
