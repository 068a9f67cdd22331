"""A relay stalled inside its claim transaction (a GC pause, SIGSTOP, a frozen VM) and the other
relays sharing the outbox."""

from __future__ import annotations

import time

import pytest

from tests.faults.invariants import Fault, verify
from tests.faults.load import log_of
from tests.faults.rig import Rig
from tests.faults.runners import describe_sessions
from tests.support.claim_pause import ClaimPause
from tests.support.rabbit import unique_name
from tests.support.relays import interleaved_events, write_events

pytestmark = pytest.mark.slow

LEASE = 2.0
DB_TIMEOUT = 5.0  # the server ends a relay transaction idle for lease / 4 (at least 1 s)
# A healthy relay must claim a fresh event within this while another one is stalled.
CLAIM_LIMIT = LEASE + 2.0


def test_relay_stalled_inside_its_claim_does_not_stop_the_others(rig: Rig) -> None:
    """Given two relays (lease 2 s, db_timeout 5 s) delivering a backlog, when one of them
    stalls inside its claim transaction (held on the server just before its COMMIT, locks
    taken: `ClaimPause`), then the
    other still claims and delivers an event of a key nobody holds within lease + 2 s; and
    after the stall everything arrives once, in order."""
    # Enough that both relays are still claiming when the hold is armed: the relays drain
    # thousands a second, and an idle one only probes (no claim, no COMMIT to hold).
    backlog = interleaved_events(8000, keys=50)
    write_events(rig.engine, rig.box, backlog)
    settings = rig.settings(lease=LEASE, db_timeout=DB_TIMEOUT)
    with (
        rig.relay(settings) as stalled,
        rig.relay(settings.replace(name=unique_name("relay"))) as healthy,
    ):
        rig.observer.wait_for_count(200, timeout=30)
        hold = ClaimPause(stalled.relay.store, after="read", max_hold=15.0)
        try:
            hold.arm()
            hold.wait_held()
            stalled_at = Fault(time.monotonic(), settings.max_in_flight, "stall")
            # An event of a key no relay holds: only the global claim lock stands in its way.
            waited = rig.probe_recovery(time.monotonic(), CLAIM_LIMIT)
            healthy.assert_running()
            sessions = describe_sessions(rig.engine, healthy.settings.name)
        finally:
            hold.close()
        if waited is None:
            rig.record_stuck("12 relay stalled in its claim", "STUCK: no claim by the other")
        assert waited is not None, (
            f"no relay claimed a fresh event within {CLAIM_LIMIT} s while one relay was "
            f"stalled inside its claim transaction; the healthy relay's sessions:\n{sessions}"
        )
        rig.deliver_everything(healthy.assert_running)
        stalled.assert_running()
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="12 relay stalled in its claim",
        started=rig.started,
        record=rig.record,
        max_duplicates=settings.max_in_flight,
        recoveries=[waited],
        write_log=log_of(backlog),
        faults=[stalled_at],
        arrivals=rig.observer.arrivals,
    )
