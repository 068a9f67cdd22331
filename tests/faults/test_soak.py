"""Long randomized fault soaks: `make soak` (OUTBOX_SOAK=1), skipped otherwise.

Knobs (environment): OUTBOX_SOAK_SECONDS (default 300) for the in-process soak,
OUTBOX_SOAK_ROUNDS (default 30) for the process soaks, OUTBOX_SOAK_SEED (default: random,
printed in the report) to replay a run's choice of faults and moments.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import pytest

from tests.faults.invariants import RECOVERY_LIMIT, verify
from tests.faults.load import Writers
from tests.faults.processes import DUPLICATES_PER_CRASH, sigkill_scenario, start_relay
from tests.faults.rig import Rig
from tests.faults.runners import RelayProcess, terminate_busy_session

SECONDS = float(os.environ.get("OUTBOX_SOAK_SECONDS", "300"))
ROUNDS = int(os.environ.get("OUTBOX_SOAK_ROUNDS", "30"))

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(
        os.environ.get("OUTBOX_SOAK") != "1",
        reason="long fault soak: run with `make soak` (OUTBOX_SOAK=1)",
    ),
]
LINK_SOAK_TIMEOUT = int(SECONDS) + 300
PROCESS_SOAK_TIMEOUT = 15 * ROUNDS + 300


def soak_seed() -> int:
    return int(os.environ.get("OUTBOX_SOAK_SEED") or random.SystemRandom().randrange(10**6))


# Faults on the links of an in-process relay. Each applies its fault, lets it last a random
# while (the observer keeps receiving meanwhile) and heals it; the broker faults may cut
# confirms off (duplicates), the database ones may not.
BROKER_FAULTS = ("amqp reset", "amqp down", "both down")
FAULTS = (*BROKER_FAULTS, "pg kill", "pg down", "pg blackhole", "latency")


def apply_fault(rig: Rig, fault: str, relay_name: str, rng: random.Random) -> None:
    pg, amqp = rig.pg_proxy, rig.amqp_proxy

    def hold() -> None:
        rig.observer.watch(rng.uniform(2.0, 8.0))

    if fault == "amqp reset":
        amqp.reset_all()
    elif fault == "amqp down":
        amqp.refuse()
        amqp.reset_all()
        hold()
    elif fault == "both down":
        for proxy in (pg, amqp):
            proxy.refuse()
            proxy.reset_all()
        hold()
    elif fault == "pg kill":
        terminate_busy_session(rig.engine, relay_name)
    elif fault == "pg down":
        pg.refuse()
        pg.reset_all()
        hold()
    elif fault == "pg blackhole":
        pg.blackhole()
        hold()
    elif fault == "latency":
        for proxy in (pg, amqp):
            proxy.set_latency(rng.uniform(0.02, 0.15))
        hold()
    else:
        raise ValueError(fault)
    rig.heal_all()


@pytest.mark.timeout(LINK_SOAK_TIMEOUT)
def test_soak_random_link_faults(rig: Rig) -> None:
    """For OUTBOX_SOAK_SECONDS, writers commit (some roll back) while random faults hit the
    relay's links at random moments; after each heal an event committed at the heal must arrive
    within RECOVERY_LIMIT; at the end every invariant holds."""
    seed = soak_seed()
    rng = random.Random(seed)
    settings = rig.settings()
    applied: Counter[str] = Counter()
    recoveries: list[float | None] = []
    with (
        Writers(
            rig.engine,
            rig.box,
            total=10**9,
            keys=100,
            rate=200,
            rollback_share=0.1,
            seed=seed,
        ) as writers,
        rig.relay(settings) as relay,
    ):
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            rig.observer.watch(rng.uniform(0.5, 4.0))
            fault = rng.choice(FAULTS)
            applied[fault] += 1
            apply_fault(rig, fault, settings.name, rng)
            recovery = rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT)
            recoveries.append(recovery)
            if recovery is None:
                rig.record_stuck(f"soak links seed={seed}", f"STUCK after {fault}: {applied}")
                raise AssertionError(
                    f"nothing committed at the heal of {fault!r} arrived within "
                    f"{2 * RECOVERY_LIMIT} s (seed {seed}); relay threads:\n{relay.stacks()}"
                )
            relay.assert_running()
        writers.stop()
        rig.deliver_everything(relay.assert_running, idle=60)
    cut = sum(applied[f] for f in BROKER_FAULTS)
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario=f"soak links {SECONDS:.0f}s",
        started=rig.started,
        record=rig.record,
        max_duplicates=cut * settings.max_in_flight,
        recoveries=recoveries,
        rolled_back=writers.rolled_back,
        notes=f"seed={seed} faults={dict(applied)}",
    )


@pytest.mark.timeout(PROCESS_SOAK_TIMEOUT)
def test_soak_sigkill_rounds(rig: Rig) -> None:
    """Scenario 7 with OUTBOX_SOAK_ROUNDS rounds."""
    sigkill_scenario(rig, ROUNDS, seed=soak_seed())


@pytest.mark.timeout(PROCESS_SOAK_TIMEOUT)
def test_soak_two_relays_killed_and_frozen(rig: Rig) -> None:
    """Two relay processes; OUTBOX_SOAK_ROUNDS times one of them, at random, is SIGKILLed (and
    restarted) or frozen for 0.5-5 s (often past its 2 s lease) and resumed, while writers
    commit. Invariants at the end; the longest time without any delivery is reported as the
    recovery figure."""
    seed = soak_seed()
    rng = random.Random(seed)
    crashes: Counter[str] = Counter()
    started = time.monotonic()
    with Writers(rig.engine, rig.box, total=10**9, keys=50, rate=250, seed=seed) as writers:
        relays: list[RelayProcess] = [start_relay(rig, "soak"), start_relay(rig, "soak")]
        try:
            for _ in range(ROUNDS):
                rig.observer.watch(rng.uniform(0.3, 2.5))
                index = rng.randrange(len(relays))
                if rng.random() < 0.5:
                    relays[index].kill()
                    relays[index] = start_relay(rig, "soak")
                    crashes["kill"] += 1
                else:
                    relays[index].pause()
                    rig.observer.watch(rng.uniform(0.5, 5.0))
                    relays[index].resume()
                    crashes["pause"] += 1
                for relay in relays:
                    relay.assert_running()
            writers.stop()

            def running() -> None:
                for relay in relays:
                    relay.assert_running()

            rig.deliver_everything(running, idle=60)
        finally:
            codes = [relay.stop() for relay in relays]
    assert codes == [0, 0], f"exit codes {codes}"
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario=f"soak 2 relays x{ROUNDS} kill/pause",
        started=rig.started,
        record=rig.record,
        max_duplicates=sum(crashes.values()) * DUPLICATES_PER_CRASH,
        recoveries=[rig.observer.longest_gap(started)],
        rolled_back=writers.rolled_back,
        notes=f"seed={seed} {dict(crashes)}",
    )
