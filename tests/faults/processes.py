"""Relay processes for fault tests: started with short leases, killed, frozen, restarted."""

from __future__ import annotations

import random
import re
import time

from tests.faults.invariants import RECOVERY_LIMIT, Fault, ScenarioResult, verify
from tests.faults.load import Writers
from tests.faults.observe import Observer
from tests.faults.rig import Rig
from tests.faults.runners import RelayProcess
from tests.support.rabbit import unique_name

MAX_IN_FLIGHT = 100
BATCH_SIZE = 100
# Short leases and waits, so that a killed or paused relay's rows are taken over in seconds.
PROCESS_OPTIONS = (
    "--lease=2s",
    "--poll-interval=200ms",
    "--retry-min=200ms",
    "--retry-max=1s",
    f"--max-in-flight={MAX_IN_FLIGHT}",
    f"--batch-size={BATCH_SIZE}",
)
# What a relay that dies (or is frozen past its lease) may have published without recording
# it: the messages waiting for their confirm, and confirmed results not yet written (they are
# written in batches of up to BATCH_SIZE).
DUPLICATES_PER_CRASH = MAX_IN_FLIGHT + BATCH_SIZE
# What a relay says when results it wrote were fenced off, and when queued events' lease ran
# out before they went out: in a scenario's notes, they tell a relay's own lease losses from
# the faults the test made.
FENCED = re.compile(r"(\d+) results were not recorded: the lease had passed to another relay")
EXPIRED = re.compile(r"lease of (\d+) queued events ran out before they were published")


def lease_notes(outputs: list[str]) -> str:
    fenced = sum(int(n) for output in outputs for n in FENCED.findall(output))
    expired = sum(int(n) for output in outputs for n in EXPIRED.findall(output))
    return f"results fenced off={fenced}, queued given up at lease end={expired}"


# After a kill, nothing arriving for this long means the dead relay's last messages are in.
QUIET = 0.25


def start_relay(rig: Rig, prefix: str = "relay", *, amqp_url: str | None = None) -> RelayProcess:
    return RelayProcess(
        database_url=rig.pg_url,
        amqp_url=amqp_url or rig.amqp_url,
        schema=rig.schema,
        exchange=rig.exchange,
        name=unique_name(prefix),
        extra=PROCESS_OPTIONS,
    )


def kill_rounds(
    rig: Rig, rounds: int, rng: random.Random
) -> tuple[list[float | None], list[Fault], list[str]]:
    """Start a relay, let it deliver for a random moment, SIGKILL it; `rounds` times.
    Returns, per round, the seconds from the start to the new relay's first delivery, the
    kills (each may duplicate at most `DUPLICATES_PER_CRASH`) and what each relay printed."""
    recoveries: list[float | None] = []
    kills: list[Fault] = []
    outputs: list[str] = []
    for _ in range(rounds):
        relay = start_relay(rig, "killed")
        try:
            # The killed predecessor's leases must run out before its keys move again.
            recovery = rig.observer.seconds_to_next_delivery(relay.started_at, 2 * RECOVERY_LIMIT)
            recoveries.append(recovery)
            assert recovery is not None, f"relay {relay.name} delivered nothing:\n{relay.output}"
            rig.observer.watch(rng.uniform(0.05, 1.0))
            relay.assert_running()
        finally:
            killed_at = time.monotonic()
            relay.kill()
            kills.append(
                Fault(
                    killed_at, DUPLICATES_PER_CRASH, "SIGKILL", until=drain_unstamped(rig.observer)
                )
            )
            outputs.append(relay.output)
    return recoveries, kills, outputs


def drain_unstamped(observer: Observer) -> float:
    """Stamp every delivery still on its way, while no relay runs; returns when it is done.

    The observer stamps a delivery when the test thread next looks, and it did not look while
    it killed the relay: what the dead relay sent just before (or while the kill was under way)
    would otherwise be stamped once the next relay runs, as if that one had sent it, and its
    redelivery would look like a duplicate no fault explains. Everything stamped until this
    returns was sent before the kill, so the kill lasts until then."""
    while observer.step(QUIET) > 0:
        pass
    return time.monotonic()


def sigkill_scenario(rig: Rig, rounds: int, seed: int) -> ScenarioResult:
    """Writers commit while relays are SIGKILLed `rounds` times; a clean relay drains."""
    rng = random.Random(seed)
    with Writers(
        rig.engine, rig.box, total=10**9, keys=50, rate=250, rollback_share=0.1, seed=seed
    ) as writers:
        recoveries, kills, outputs = kill_rounds(rig, rounds, rng)
        writers.stop()
    final = start_relay(rig, "final")
    try:
        rig.deliver_everything(final.assert_running)
    finally:
        code = final.stop()
    assert code == 0, f"the final relay exited with {code}:\n{final.output}"
    return verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario=f"7 SIGKILL x{rounds} + restart",
        started=rig.started,
        record=rig.record,
        max_duplicates=rounds * DUPLICATES_PER_CRASH,
        recoveries=recoveries,
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        faults=kills,
        arrivals=rig.observer.arrivals,
        notes=f"seed={seed}, {lease_notes([*outputs, final.output])}",
    )
