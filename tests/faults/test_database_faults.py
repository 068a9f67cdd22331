"""Database-side faults on the relay's real PostgreSQL sessions: sessions killed mid-claim and
mid-update, the database unreachable, and a silent (blackholed) link."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.faults.invariants import RECOVERY_LIMIT, verify
from tests.faults.load import Writers
from tests.faults.rig import Rig
from tests.faults.runners import HoldPoint, KilledSession, terminate_busy_session

pytestmark = pytest.mark.slow


def test_database_sessions_killed_mid_claim_and_mid_update(rig: Rig) -> None:
    """Given writers committing and a relay running, when its database sessions are terminated
    (pg_terminate_backend) six times, each the moment one of them is inside a statement or a
    transaction (a claim, a result update), then nothing is lost, duplicated or reordered, no
    attempt is spent, and an event committed after each kill arrives within seconds."""
    kills = 6
    settings = rig.settings()
    killed: list[KilledSession] = []
    recoveries: list[float | None] = []
    with (
        Writers(rig.engine, rig.box, total=3000, keys=50, rate=600, seed=3) as writers,
        rig.relay(settings) as relay,
    ):
        for round_ in range(1, kills + 1):
            rig.observer.wait_for_count(round_ * 400, timeout=30)
            sessions = terminate_busy_session(rig.engine, settings.name)
            killed.extend(sessions)
            # The relay may go on publishing what it holds; an event committed after the kill
            # arrives only once it claims again on a new session.
            recoveries.append(rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT))
            relay.assert_running()
        writers.join()
        rig.deliver_everything(relay.assert_running)
    busy = [s for s in killed if s.busy]
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="3 pg sessions killed x6",
        started=rig.started,
        record=rig.record,
        # A cut session can only lose the record of results, which the relay keeps and
        # writes again: nothing is published twice.
        max_duplicates=0,
        recoveries=recoveries,
        notes=f"sessions killed={len(killed)}, busy ones doing: "
        + ", ".join(f"{k}={n}" for k, n in sorted(Counter(s.doing for s in busy).items())),
    )
    assert len(busy) >= kills // 2, f"too few kills hit a busy session: {busy}"


def test_database_unreachable_then_back(rig: Rig) -> None:
    """Given a relay running, when the database is unreachable for 5 s (sessions reset, new
    connects refused) - longer than the relay's 3 s lease - then the relay stops publishing,
    keeps running, spends no attempt, and delivers again within seconds of the database's
    return: nothing lost, duplicated or reordered."""
    settings = rig.settings()
    with (
        Writers(rig.engine, rig.box, total=3000, keys=50, rate=400, seed=4) as writers,
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
    )


def test_blackholed_database_link_times_out_and_recovers(rig: Rig) -> None:
    """Given writers committing and a relay running, when its database link silently drops
    every byte for 5 s, starting while the answer to one of its COMMITs is on its way back,
    then the relay's deadline (db_timeout 2 s) ends every blocked call, it keeps running, and
    after the link heals it delivers again within seconds: nothing lost, duplicated or
    reordered.

    The moment is chosen, not random: the relay's database thread is held just before a
    COMMIT, the link is slowed down so that the answer spends 0.5 s in the proxy, and the
    blackhole starts as soon as the COMMIT has gone upstream. (A blackhole starting anywhere
    else ends either in a guarded statement, or, for a COMMIT that never arrived, in the
    server's idle_in_transaction_session_timeout, whose FIN reaches the relay after the heal.)
    """
    settings = rig.settings()
    proxy = rig.pg_proxy
    with (
        Writers(rig.engine, rig.box, total=3000, keys=50, rate=400, seed=5) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(300, timeout=30)
        hold = HoldPoint(relay.relay.store.engine, "commit")
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
    )
