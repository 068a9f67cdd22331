"""The fault rig can fail: broken relays (and a broken writer) run through the same scenarios
and checks as the real ones, and the checks must catch them.

Each test runs one scenario twice: with the real relay, which must pass every check, and with
one mutant (`mutants.py`), which must fail the check named for it. The pair shows that the
scenario exercises what the mutant breaks, and that the failure is the mutant's, not the
scenario's. Runs are small (a few hundred events) to keep `make test` short.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from outbox import Event
from relay.relay import Relay
from tests.faults.invariants import (
    Findings,
    check_scenario,
    row_states,
    scenario_result,
    wait_until_finished,
)
from tests.faults.load import Writers, log_of, write_in_transaction
from tests.faults.mutants import (
    ClaimLog,
    TwoInFlightPerKey,
    build_mark_on_publish,
    build_relay_with,
    drop_every,
    ignore_claim_tokens,
    write_outside_transaction,
)
from tests.faults.observe import Observer
from tests.faults.rig import Rig
from tests.faults.runners import CallGate
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import write_events

pytestmark = pytest.mark.slow

CORRECT, MUTANT = "correct", "mutant"
BOTH = pytest.mark.parametrize("variant", [CORRECT, MUTANT])


def judge(
    rig: Rig, findings: Findings, *, variant: str, scenario: str, caught_by: set[str]
) -> None:
    """The real relay passes every check; the mutant fails (at least) `caught_by`."""
    failed = sorted(findings.failed)
    rig.record(
        scenario_result(
            findings,
            f"{scenario} ({variant})",
            rig.started,
            None,
            (),
            notes=f"failed checks: {failed}" if failed else "",
        )
    )
    if variant == CORRECT:
        assert not findings.problems, f"the real relay failed the scenario: {findings.problems}"
    else:
        missed = caught_by - findings.failed
        assert not missed, (
            f"the checks did not catch the mutant: {sorted(missed)} passed "
            f"(failed: {failed or 'none'})"
        )


def wait_for(condition: Callable[[], bool], observer: Observer, timeout: float, what: str) -> None:
    """Keep the observer receiving until `condition` holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        observer.step()


# -- two events of a key in flight: reordering ---------------------------------------------------


@BOTH
def test_two_events_of_a_key_in_flight_is_caught_as_reordering(rig: Rig, variant: str) -> None:
    """Given keys whose fourth event is refused by the broker (unroutable) until its routing
    is bound, when the relay publishes (the mutant: two events per key in flight) and then the
    routing is bound, then the real relay holds each such key back until its refused event
    goes through, and the mutant's next event overtakes it: reordered."""
    keys, per_key, bad_keys, bad_at = 20, 10, 5, 3
    events: list[Event] = []
    bad: set[str] = set()
    held: set[str] = set()
    for position in range(per_key):
        for k in range(keys):
            is_bad = k < bad_keys and position == bad_at
            event = Event(
                type="bad.x" if is_bad else "ok.placed", key=f"k{k}", payload={"p": position}
            )
            events.append(event)
            if is_bad:
                bad.add(str(event.id))
            elif k < bad_keys and position > bad_at:
                held.add(str(event.id))
    write_events(rig.engine, rig.box, events)
    with QueueTap(rig.amqp_url, prefix="mutant-tap") as tap:
        exchange = tap.declare_exchange(unique_name("mutant-ex"))
        tap.bind(exchange, "ok.#")
        observer = Observer(tap)
        settings = rig.settings(exchange=exchange, max_attempts=50, retry_min=0.1, retry_max=0.3)
        relay = build_relay_with(settings)
        if variant == MUTANT:
            TwoInFlightPerKey(settings.max_in_flight).install(relay)
        with rig.relay(settings, relay) as running:
            free = {str(e.id) for e in events} - bad - held
            missing = observer.wait_for_ids(free, idle_timeout=10)
            assert not missing, f"{len(missing)} events of free keys did not arrive"

            def refused() -> bool:
                states = row_states(rig.engine, rig.box)
                return all(states[i].attempts >= 1 for i in bad)

            wait_for(refused, observer, 10, "every unroutable event refused once")
            tap.bind(exchange, "bad.#")
            observer.wait_for_ids({str(e.id) for e in events}, idle_timeout=5)
            wait_until_finished(rig.engine, rig.box, timeout=10)
            running.assert_running()
        deliveries = observer.settle(0.5)
    findings = check_scenario(
        rig.engine,
        rig.box,
        deliveries,
        max_duplicates=0,
        refused=bad,
        write_log=log_of(events),
    )
    judge(
        rig,
        findings,
        variant=variant,
        scenario="M1 two in flight per key",
        caught_by={"reordered", "write log order"},
    )


# -- marked published before the ack: loss after a broker cut ----------------------------------


@BOTH
def test_marking_published_before_the_ack_is_caught_as_loss(rig: Rig, variant: str) -> None:
    """Given a connected relay, when its broker link goes silent (bytes vanish) while events
    are committed and published into it, and the link is then reset and healed, then the
    real relay publishes the unconfirmed events again, and the mutant (which recorded them
    published when it handed them over) never does: lost."""
    settings = rig.settings()
    claims = ClaimLog()
    relay: Relay = (
        build_mark_on_publish(settings, claims)
        if variant == MUTANT
        else build_relay_with(settings, store=claims.spy)
    )
    proxy = rig.amqp_proxy
    with rig.relay(settings, relay) as running:
        connected = rig.probe_recovery(time.monotonic(), 20)
        assert connected is not None, "the relay delivered nothing before the fault"
        proxy.blackhole()
        before = proxy.bytes_from_clients
        with Writers(rig.engine, rig.box, total=300, keys=40, threads=2, seed=21) as writers:
            writers.join()
        # Published into the silence: at least a few messages' worth of bytes went in.
        proxy.wait_until(lambda: proxy.bytes_from_clients > before + 4000, timeout=10)
        proxy.reset_all()
        proxy.heal()
        rig.observer.wait_for_ids(rig.committed_ids(), idle_timeout=3)
        wait_until_finished(rig.engine, rig.box, timeout=10)
        running.assert_running()
    findings = check_scenario(
        rig.engine,
        rig.box,
        rig.observer.settle(0.5),
        max_duplicates=settings.max_in_flight,
        write_log=writers.log,
    )
    judge(
        rig,
        findings,
        variant=variant,
        scenario="M2 marked before the ack",
        caught_by={"lost", "published never delivered", "write log lost"},
    )


# -- result writes that ignore the claim token: a frozen relay overwrites its successor ---------


@BOTH
def test_ignoring_the_claim_token_is_caught(rig: Rig, variant: str) -> None:
    """Given relay A whose every publish is refused (its exchange routes nothing; one attempt
    makes an event dead), when A is stalled just before it records those failures, its lease
    runs out, relay B claims the rows, publishes them and is about to record the acks, and
    then A writes its late results, then the real store fences A's writes off (the rows end
    published, no attempt spent), while the mutant's writes land on B's rows: dead rows that
    were delivered, and B's results fenced off in turn."""
    keys, per_key = 10, 10
    events = [
        Event(type="order.placed", key=f"k{k}", payload={"p": p})
        for p in range(per_key)
        for k in range(keys)
    ]
    write_events(rig.engine, rig.box, events)
    claims = ClaimLog()
    a_settings = rig.settings(
        name=unique_name("frozen"),
        exchange=rig.tap.declare_exchange(unique_name("routes-nothing")),
        lease=2.0,
        db_timeout=5.0,
        max_attempts=1,
    )
    b_settings = rig.settings(name=unique_name("successor"))
    a = build_relay_with(
        a_settings, store=ignore_claim_tokens(claims) if variant == MUTANT else claims.spy
    )
    b = build_relay_with(b_settings, store=claims.spy)
    a_gate = CallGate(a.store, "record_failures")
    b_gate = CallGate(b.store, "mark_and_end_runs")
    a_gate.arm()
    b_gate.arm()
    try:
        with rig.relay(a_settings, a) as frozen:
            a_gate.wait_held()  # A's publishes were refused; it is about to record that
            a_token = a_gate.args[0]
            failed = [f.event.seq for f in a_gate.args[1]]  # type: ignore[attr-defined]
            with rig.relay(b_settings, b) as successor:
                b_gate.wait_held()  # B holds the rows, published, and is about to record it
                taken = [s for s in failed if claims.token(s) not in (None, a_token)]
                assert taken, "B did not claim the rows A was about to write about"
                a_gate.release()
                a_gate.wait_done()
                fenced_a = len(failed) - int(a_gate.result)  # type: ignore[call-overload]
                frozen.stop()
                b_gate.release()
                rig.observer.wait_for_ids({str(e.id) for e in events}, idle_timeout=2)
                wait_until_finished(rig.engine, rig.box, timeout=3)
                successor.assert_running()
    finally:
        a_gate.close()
        b_gate.close()
    findings = check_scenario(
        rig.engine,
        rig.box,
        rig.observer.settle(0.5),
        max_duplicates=0,
        write_log=log_of(events),
    )
    if variant == CORRECT:
        assert fenced_a == len(failed), "the real store let a lost lease's failures land"
    judge(
        rig,
        findings,
        variant=variant,
        scenario="M3 result writes ignore the token",
        caught_by={"final status", "attempts spent"},
    )


# -- a publisher that drops events: loss ----------------------------------------------------


@BOTH
def test_dropping_every_thousandth_event_is_caught_as_loss(rig: Rig, variant: str) -> None:
    """Given writers committing 1,200 events, when the relay's publisher (the mutant: one that
    reports every 1,000th message confirmed without sending it) delivers them, then the real
    relay delivers all, and the mutant's dropped event is lost although marked published."""
    settings = rig.settings()
    relay = build_relay_with(settings, publisher=drop_every(1000) if variant == MUTANT else None)
    with (
        Writers(rig.engine, rig.box, total=1200, keys=40, seed=22) as writers,
        rig.relay(settings, relay) as running,
    ):
        writers.join()
        rig.observer.wait_for_ids(rig.committed_ids(), idle_timeout=2)
        wait_until_finished(rig.engine, rig.box, timeout=10)
        running.assert_running()
    findings = check_scenario(
        rig.engine, rig.box, rig.observer.settle(0.5), max_duplicates=0, write_log=writers.log
    )
    judge(
        rig,
        findings,
        variant=variant,
        scenario="M4 drops every 1000th",
        caught_by={"lost", "published never delivered", "write log lost"},
    )


# -- a writer outside the application's transaction: a rolled-back event delivered -----------


@BOTH
def test_publishing_a_rolled_back_event_is_caught_as_unexpected(rig: Rig, variant: str) -> None:
    """Given writers that roll back a third of their transactions, when their events are
    written (the mutant: on a connection of its own, committed at once) and relayed, then
    nothing rolled back reaches the broker from the real writer, and the mutant's rolled-back
    events do: unexpected."""
    settings = rig.settings()
    write = write_outside_transaction if variant == MUTANT else write_in_transaction
    with (
        Writers(
            rig.engine, rig.box, total=300, keys=20, rollback_share=0.3, seed=23, write=write
        ) as writers,
        rig.relay(settings) as running,
    ):
        writers.join()
        assert writers.rolled_back, "no transaction rolled back: the scenario tests nothing"
        rig.observer.wait_for_ids(rig.committed_ids(), idle_timeout=3)
        wait_until_finished(rig.engine, rig.box, timeout=10)
        running.assert_running()
    findings = check_scenario(
        rig.engine,
        rig.box,
        rig.observer.settle(0.5),
        max_duplicates=0,
        rolled_back=writers.rolled_back,
        write_log=writers.log,
    )
    judge(
        rig,
        findings,
        variant=variant,
        scenario="M5 rolled back, then published",
        caught_by={"unexpected", "rolled back in outbox"},
    )
