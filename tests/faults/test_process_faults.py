"""The relay as `outbox-relay run` processes: SIGKILLed at random moments and restarted, and
paused (SIGSTOP) past its lease while a second relay takes over."""

from __future__ import annotations

import time

import pytest

from tests.faults.invariants import RECOVERY_LIMIT, verify
from tests.faults.load import Writers
from tests.faults.processes import DUPLICATES_PER_CRASH, sigkill_scenario, start_relay
from tests.faults.rig import Rig
from tests.faults.runners import leased_by

pytestmark = pytest.mark.slow

KILL_ROUNDS = 20  # make soak runs OUTBOX_SOAK_ROUNDS (30 by default)
PAUSE = 4.0  # seconds frozen: twice the lease


def test_relay_sigkilled_at_random_moments_and_restarted(rig: Rig) -> None:
    """Given writers committing, when relay processes are SIGKILLed at random moments ten
    times (each restarted at once) and a clean relay drains at the end, then nothing is lost
    or reordered, each crash duplicates at most what it had in flight or unrecorded, no attempt
    is spent, and each new relay delivers within seconds (once the dead one's lease is over)."""
    sigkill_scenario(rig, KILL_ROUNDS, seed=7)


def test_paused_relay_is_fenced_off_after_its_lease(rig: Rig) -> None:
    """Given two relay processes sharing the outbox (lease 2 s) and writers committing, when
    one is frozen (SIGSTOP) for 4 s while it holds leases and then resumed, then the other
    takes its rows over once the lease ends, the frozen relay's late results are fenced off
    (nothing marked published without a confirm, no order violation), and duplicates stay
    within what the frozen relay had in flight or unrecorded."""
    with Writers(rig.engine, rig.box, total=4000, keys=50, rate=400, seed=8) as writers:
        frozen, other = start_relay(rig, "frozen"), start_relay(rig, "other")
        try:
            rig.observer.wait_for_count(500, timeout=30)
            deadline = time.monotonic() + 10
            while not (leased := leased_by(rig.engine, rig.box, frozen.name)):
                assert time.monotonic() < deadline, "the relay to freeze never held a lease"
                rig.observer.step()
            frozen.pause()
            paused_at = time.monotonic()
            rig.observer.watch(0.5)  # what it published just before the pause arrives
            taken_over = leased - rig.observer.seen()
            rig.observer.watch(PAUSE - 0.5)
            other.assert_running()
            frozen.resume()
            # From the pause to the first delivery of a row it held (maybe before the resume).
            recovery = rig.observer.seconds_until_any_delivered(
                taken_over, paused_at, 2 * RECOVERY_LIMIT
            )
            writers.join()

            def running() -> None:
                frozen.assert_running()
                other.assert_running()

            rig.deliver_everything(running)
        finally:
            codes = {relay.name: relay.stop() for relay in (frozen, other)}
    assert set(codes.values()) == {0}, f"exit codes {codes}:\n{frozen.output}\n{other.output}"
    fenced = frozen.output.count("lease had passed to another relay")
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="8 SIGSTOP 4s past lease 2s",
        started=rig.started,
        record=rig.record,
        max_duplicates=DUPLICATES_PER_CRASH,
        recoveries=[recovery] if taken_over else [],
        notes=f"leased at pause={len(leased)} taken over={len(taken_over)} "
        f"while frozen={recovery is not None and recovery < PAUSE} "
        f"fenced-write warnings={fenced}",
    )
