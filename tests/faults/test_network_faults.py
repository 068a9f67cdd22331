"""Slow links, and a burst of application writers while faults hit both of the relay's links."""

from __future__ import annotations

import time

import pytest

from tests.faults.invariants import RECOVERY_LIMIT, Fault, verify
from tests.faults.load import Writers
from tests.faults.rig import Rig
from tests.faults.runners import terminate_busy_session

pytestmark = pytest.mark.slow

LATENCY = 0.1  # one way: every round trip on a link takes 200 ms more


def test_latency_on_both_links_everything_arrives_in_order(rig: Rig) -> None:
    """Given writers committing and a relay running, when both of its links get 100 ms of
    latency each way, then everything still arrives, once, in per-key order, and no attempt is
    spent: slow confirms and slow claims are not failures."""
    settings = rig.settings()
    with (
        Writers(
            rig.engine, rig.box, total=900, keys=100, rate=600, rollback_share=0.1, seed=6
        ) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(150, timeout=30)
        for proxy in (rig.pg_proxy, rig.amqp_proxy):
            proxy.set_latency(LATENCY)
        slow_since = time.monotonic()
        writers.join()
        rig.deliver_everything(relay.assert_running)
        slow_for = time.monotonic() - slow_since
        rig.heal_all()
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="6 latency 100ms both links",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        notes=f"{slow_for:.1f}s under latency",
    )


def test_burst_of_writers_with_rollbacks_while_links_fail(rig: Rig) -> None:
    """Given six writer threads committing small transactions (a fifth of them rolled back),
    when, during the burst, the broker link is reset, the relay's database sessions are killed
    mid-transaction, and both links get 100 ms latency for 2 s, then every committed event
    arrives in per-key order, no rolled-back event is ever delivered, duplicates stay within
    one window per broker reset, and the relay delivers again within seconds of each fault."""
    settings = rig.settings()
    recoveries: list[float | None] = []
    faults: list[Fault] = []
    with (
        Writers(
            rig.engine,
            rig.box,
            total=4000,
            keys=40,
            threads=6,
            rate=700,
            rollback_share=0.2,
            seed=11,
        ) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(300, timeout=30)

        rig.amqp_proxy.reset_all()
        faults.append(Fault(time.monotonic(), settings.max_in_flight, "broker reset"))
        recoveries.append(rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT))
        relay.assert_running()

        rig.observer.watch(0.5)
        terminate_busy_session(rig.engine, settings.name)
        faults.append(Fault(time.monotonic(), 0, "sessions killed"))
        recoveries.append(rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT))
        relay.assert_running()

        for proxy in (rig.pg_proxy, rig.amqp_proxy):
            proxy.set_latency(LATENCY)
        faults.append(Fault(time.monotonic(), 0, "latency"))
        rig.observer.watch(2.0)
        rig.heal_all()
        recoveries.append(rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT))
        relay.assert_running()

        writers.join()
        rig.deliver_everything(relay.assert_running)
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="11 writer burst + faults 1/3/6",
        started=rig.started,
        record=rig.record,
        max_duplicates=settings.max_in_flight,
        recoveries=recoveries,
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        faults=faults,
        arrivals=rig.observer.arrivals,
        notes=f"rolled back={len(writers.rolled_back)}",
    )
