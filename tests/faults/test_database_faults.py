"""Database-side faults on the relay's real PostgreSQL sessions: sessions killed mid-claim and
mid-update, the database unreachable, and a silent (blackholed) link."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.faults.invariants import RECOVERY_LIMIT, Fault, verify
from tests.faults.load import Writers
from tests.faults.rig import Rig
from tests.faults.runners import HoldPoint, terminate_relay_sessions
from tests.support.claim_pause import ClaimPause

pytestmark = pytest.mark.slow


def test_database_sessions_killed_mid_claim_and_mid_update(rig: Rig) -> None:
    """Given writers committing (some rolling back) and a relay running, when its database
    sessions are terminated (pg_terminate_backend) six times at chosen moments - three times
    inside a claim (its statements done and its locks held, the COMMIT about to go out), three
    times as a result write is about to run (rows confirmed by the broker, about to be marked
    published) - then nothing is lost, duplicated or reordered, no attempt is spent, and an
    event committed after each kill arrives within seconds.

    The moments are chosen, not hoped for: the relay is held at the point while its session
    is killed (`HoldPoint` holds its thread before the mark; `ClaimPause` holds the claim on
    the server, as the claim is one round trip), and the test checks that the held session
    is among those killed."""
    rounds = 3
    settings = rig.settings()
    recoveries: list[float | None] = []
    faults: list[Fault] = []
    hit: Counter[str] = Counter()
    with (
        Writers(
            rig.engine, rig.box, total=3000, keys=50, rate=600, rollback_share=0.1, seed=3
        ) as writers,
        rig.relay(settings) as relay,
    ):
        points: dict[str, HoldPoint | ClaimPause] = {
            "mid-claim": ClaimPause(relay.relay.store, after="read"),
            "mid-update": HoldPoint.before_statement(relay.relay.store, within="mark_and_end_runs"),
        }
        try:
            for round_ in range(rounds):
                for moment, hold in points.items():
                    rig.observer.wait_for_count((2 * round_ + 1) * 300, timeout=30)
                    hold.arm()
                    hold.wait_held()
                    killed = terminate_relay_sessions(rig.engine, settings.name)
                    faults.append(Fault(time.monotonic(), 0, moment))
                    hold.release()
                    assert hold.held_pid in {k.pid for k in killed}, (
                        f"{moment}: the held session {hold.held_pid} was not killed: {killed}"
                    )
                    hit[moment] += 1
                    # The relay may go on publishing what it holds; an event committed after
                    # the kill arrives only once it claims again on a new session.
                    recoveries.append(rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT))
                    relay.assert_running()
        finally:
            for hold in points.values():
                hold.close()
        writers.join()
        rig.deliver_everything(relay.assert_running)
    deliveries = rig.observer.settle()
    verify(
        rig.engine,
        rig.box,
        deliveries,
        scenario="3 pg sessions killed x6",
        started=rig.started,
        record=rig.record,
        # A cut session can only lose the record of results, which the relay keeps and
        # writes again: nothing is published twice.
        max_duplicates=0,
        recoveries=recoveries,
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        faults=faults,
        arrivals=rig.observer.arrivals,
        notes=", ".join(f"{k}={n}" for k, n in sorted(hit.items())),
    )
    assert hit == {"mid-claim": rounds, "mid-update": rounds}


def test_database_unreachable_then_back(rig: Rig) -> None:
    """Given a relay running, when the database is unreachable for 5 s (sessions reset, new
    connects refused) - longer than the relay's 3 s lease - then the relay stops publishing,
    keeps running, spends no attempt, and delivers again within seconds of the database's
    return: nothing lost, duplicated or reordered."""
    settings = rig.settings()
    with (
        Writers(
            rig.engine, rig.box, total=3000, keys=50, rate=400, rollback_share=0.1, seed=4
        ) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(300, timeout=30)
        rig.pg_proxy.refuse()
        rig.pg_proxy.reset_all()
        # What it had claimed may still go out until its lease runs out locally.
        rig.observer.watch(settings.lease + 0.5)
        during = rig.observer.watch(1.5)
        relay.assert_running()
        rig.pg_proxy.heal()
        healed_at = time.monotonic()
        recovery = rig.observer.seconds_to_next_delivery(healed_at, 2 * RECOVERY_LIMIT)
        writers.join()
        rig.deliver_everything(relay.assert_running)
    assert during == 0, f"{during} messages arrived with the database unreachable past the lease"
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="4 pg unreachable 5s",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,
        recoveries=[recovery],
        rolled_back=writers.rolled_back,
        write_log=writers.log,
    )


def test_blackholed_database_link_times_out_and_recovers(rig: Rig) -> None:
    """Given writers committing and a relay running, when its database link silently drops
    every byte for 5 s, starting while the answer to one of its result writes is on its way
    back, then the relay's deadline (db_timeout 2 s) ends every blocked call, it keeps
    running, and after the link heals it delivers again within seconds: nothing lost,
    duplicated or reordered.

    The moment is chosen, not random: the relay's database thread is held just before it
    sends a write of confirms (one script, one implicit transaction: the server commits it
    and its answer says so), the link is slowed down so that the answer spends 0.5 s in the
    proxy, and the blackhole starts as soon as the write has gone upstream. (A blackhole
    starting anywhere else ends in a guarded statement.)
    """
    settings = rig.settings()
    proxy = rig.pg_proxy
    with (
        Writers(
            rig.engine, rig.box, total=3000, keys=50, rate=400, rollback_share=0.1, seed=5
        ) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(300, timeout=30)
        hold = HoldPoint.before_statement(relay.relay.store, within="mark_and_end_runs")
        try:
            hold.arm()
            hold.wait_held()
            proxy.set_latency(0.5)
            sent = proxy.bytes_up
            hold.release()
            proxy.wait_until(lambda: proxy.bytes_up > sent, timeout=5)
            proxy.blackhole()  # drops the COMMIT's answer, still held back by the latency
        finally:
            hold.close()
        rig.observer.watch(settings.lease + 0.5)
        during = rig.observer.watch(1.5)
        relay.assert_running()
        proxy.heal()
        healed_at = time.monotonic()
        recovery = rig.observer.seconds_to_next_delivery(healed_at, RECOVERY_LIMIT)
        if recovery is None:
            rig.record_stuck("5 pg blackhole 5s", "STUCK: no delivery after the heal")
            raise AssertionError(
                f"nothing delivered within {RECOVERY_LIMIT} s of the heal; the relay's "
                f"threads are at:\n{relay.stacks()}"
            )
        writers.join()
        rig.deliver_everything(relay.assert_running)
    assert during == 0, f"{during} messages arrived with the database silent past the lease"
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="5 pg blackhole 5s",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,
        recoveries=[recovery],
        rolled_back=writers.rolled_back,
        write_log=writers.log,
    )
