"""The relay as `outbox-relay run` processes: SIGKILLed at random moments and restarted, and
paused (SIGSTOP) past its lease while a second relay takes over."""

from __future__ import annotations

import time

import pytest

from tests.faults.invariants import RECOVERY_LIMIT, Fault, verify
from tests.faults.load import Writers
from tests.faults.processes import (
    DUPLICATES_PER_CRASH,
    FENCED,
    lease_notes,
    sigkill_scenario,
    start_relay,
)
from tests.faults.rig import Rig
from tests.faults.runners import via_proxy_amqp

pytestmark = pytest.mark.slow

KILL_ROUNDS = 20  # make soak runs OUTBOX_SOAK_ROUNDS (30 by default)
LEASE = 2.0  # the relays' lease (tests.faults.processes.start_relay)
PAUSE = 2 * LEASE  # seconds frozen
# What a relay logs (relay/relay.py) when the store fenced its results off, and when queued
# events of a claim whose lease ran out are given up.


# Twenty rounds, each waiting out the dead relay's 2 s lease: 40 s of its own, 34 to 52 s
# seen in all; a loaded machine took it past the suite's 60 s.
@pytest.mark.timeout(120)
def test_relay_sigkilled_at_random_moments_and_restarted(rig: Rig) -> None:
    """Given writers committing, when relay processes are SIGKILLed at random moments ten
    times (each restarted at once) and a clean relay drains at the end, then nothing is lost
    or reordered, each crash duplicates at most what it had in flight or unrecorded, no attempt
    is spent, and each new relay delivers within seconds (once the dead one's lease is over)."""
    sigkill_scenario(rig, KILL_ROUNDS, seed=7)


LINK_LATENCY = 0.1  # each way, on the frozen relay's broker link


def test_paused_relay_is_fenced_off_after_its_lease(rig: Rig) -> None:
    """Given two relay processes sharing the outbox (lease 2 s) and writers committing, when
    one is frozen (SIGSTOP) for 4 s while it has messages waiting for their confirms and then
    resumed, then the other takes its rows over once the lease ends, the frozen relay's late
    results are fenced off (it says so, and nothing is marked published without a confirm, no
    order violation), and the pause duplicates at most what the frozen relay had in flight or
    unrecorded.

    The frozen relay's broker link has 100 ms latency each way (through the fault proxy), so
    each of its keys waits 200 ms for a confirm: whenever it is frozen, it holds messages
    published and not yet recorded, and their late results must meet the fence. The scenario
    fails unless the frozen relay reports fenced results after its resume."""
    rig.amqp_proxy.set_latency(LINK_LATENCY)
    slow_link = via_proxy_amqp(rig.amqp_url, rig.amqp_proxy)
    with Writers(
        rig.engine, rig.box, total=4000, keys=50, rate=400, rollback_share=0.1, seed=8
    ) as writers:
        frozen = start_relay(rig, "frozen", amqp_url=slow_link)
        other = start_relay(rig, "other")
        try:
            rig.observer.wait_for_count(500, timeout=30)
            # The frozen relay is connected and publishing: its link carries more than the
            # handshake (its confirms come back through the proxy).
            down = rig.amqp_proxy.bytes_down
            rig.amqp_proxy.wait_until(lambda: rig.amqp_proxy.bytes_down > down + 1000, 10)
            frozen.pause()
            # Dated back by the slow link's round trip: what the frozen relay had just sent is
            # still on the link when it freezes, reaches the consumer after this moment, and
            # is sent again by the other relay; that redelivery is this pause's doing.
            # And it lasts until its lease is over (no other relay can send its events
            # before that): under load the link (a Python proxy) and the consumer's stamps
            # may lag well past the link's latency, and what the frozen relay sent before
            # it froze arrives during the pause. Not until the resume: a redelivery of what
            # the other relay sent after the takeover would be a fencing failure.
            paused_at = time.monotonic() - 2 * LINK_LATENCY
            paused = Fault(paused_at, DUPLICATES_PER_CRASH, "SIGSTOP", until=paused_at + LEASE)
            rig.observer.watch(PAUSE)
            other.assert_running()
            frozen.resume()
            resumed_at = time.monotonic()
            recovery = rig.probe_recovery(resumed_at, 2 * RECOVERY_LIMIT)
            writers.join()

            def running() -> None:
                frozen.assert_running()
                other.assert_running()

            rig.deliver_everything(running)
        finally:
            codes = {relay.name: relay.stop() for relay in (frozen, other)}
            rig.amqp_proxy.heal()
    assert set(codes.values()) == {0}, f"exit codes {codes}:\n{frozen.output}\n{other.output}"
    fenced = sum(int(n) for n in FENCED.findall(frozen.output))
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="8 SIGSTOP 4s past lease 2s",
        started=rig.started,
        record=rig.record,
        max_duplicates=DUPLICATES_PER_CRASH,
        recoveries=[recovery],
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        faults=[paused],
        arrivals=rig.observer.arrivals,
        notes=lease_notes([frozen.output]),
    )
    assert fenced > 0, (
        "the frozen relay reported no fenced-off results: it held nothing unrecorded when "
        f"its lease ran out, so the fence was never tested:\n{frozen.output[-3000:]}"
    )
