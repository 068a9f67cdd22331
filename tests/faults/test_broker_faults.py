"""Broker-side faults on the relay's real AMQP connection: resets, an unreachable broker, a memory
alarm, and messages the broker cannot route."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from outbox import Event
from relay.admin import Admin
from relay.admin_records import Selector
from tests.faults.invariants import RECOVERY_LIMIT, Fault, verify, wait_until_finished
from tests.faults.load import Writers, log_of
from tests.faults.observe import Observer
from tests.faults.rig import Rig
from tests.support.rabbit import QueueTap, broker_memory_alarm, unique_name
from tests.support.relays import write_events

pytestmark = pytest.mark.slow


def test_broker_connection_reset_mid_stream(rig: Rig) -> None:
    """Given writers committing and a relay publishing, when the AMQP link is reset (RST) three
    times mid-stream, then everything arrives in key order, at most one window duplicated per
    reset, and an event committed right after each reset arrives within seconds."""
    resets = 3
    settings = rig.settings()
    recoveries: list[float | None] = []
    faults: list[Fault] = []
    with (
        Writers(
            rig.engine, rig.box, total=3000, keys=50, rate=1000, rollback_share=0.1, seed=1
        ) as writers,
        rig.relay(settings) as relay,
    ):
        for round_ in range(1, resets + 1):
            rig.observer.wait_for_count(round_ * 500, timeout=30)
            rig.amqp_proxy.reset_all()
            faults.append(Fault(time.monotonic(), settings.max_in_flight, "broker reset"))
            recoveries.append(rig.probe_recovery(time.monotonic(), 2 * RECOVERY_LIMIT))
            relay.assert_running()
        writers.join()
        rig.deliver_everything(relay.assert_running)
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="1 broker reset x3",
        started=rig.started,
        record=rig.record,
        max_duplicates=resets * settings.max_in_flight,
        recoveries=recoveries,
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        faults=faults,
        arrivals=rig.observer.arrivals,
    )


def test_broker_unreachable_then_back(rig: Rig) -> None:
    """Given a publishing relay, when the broker is unreachable for 6 s (existing connection
    reset, new connects refused), then nothing is published meanwhile, no attempt is spent,
    and once it is back everything arrives within seconds."""
    outage = 6.0
    settings = rig.settings()
    with (
        Writers(
            rig.engine, rig.box, total=2000, keys=50, rate=400, rollback_share=0.1, seed=2
        ) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(300, timeout=30)
        rig.amqp_proxy.refuse()
        rig.amqp_proxy.reset_all()
        cut = Fault(time.monotonic(), settings.max_in_flight, "broker cut")
        rig.observer.watch(1.0)  # what was enqueued before the reset reaches the tap
        during = rig.observer.watch(outage - 1.0)
        relay.assert_running()
        rig.amqp_proxy.heal()
        healed_at = time.monotonic()
        recovery = rig.observer.seconds_to_next_delivery(healed_at, 2 * RECOVERY_LIMIT)
        writers.join()
        rig.deliver_everything(relay.assert_running)
    assert during == 0, f"{during} messages arrived while the broker was unreachable"
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="2 broker unreachable 6s",
        started=rig.started,
        record=rig.record,
        max_duplicates=settings.max_in_flight,
        recoveries=[recovery],
        rolled_back=writers.rolled_back,
        write_log=writers.log,
        faults=[cut],
        arrivals=rig.observer.arrivals,
    )


@pytest.mark.broker_wide
def test_broker_memory_alarm_blocks_then_everything_arrives(rig: Rig) -> None:
    """Given a publishing relay, when the broker raises a memory alarm for 5 s (publishers
    blocked, below pika's 30 s blocked-connection timeout), then the relay waits it out and
    everything arrives once the alarm clears, none lost or reordered, no attempt spent."""
    settings = rig.settings()
    with (
        Writers(
            rig.engine, rig.box, total=2000, keys=50, rate=250, rollback_share=0.1, seed=9
        ) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(300, timeout=30)
        with broker_memory_alarm():
            rig.observer.watch(1.0)  # what was enqueued before the alarm reaches the tap
            during = rig.observer.watch(4.0)
            relay.assert_running()
        cleared_at = time.monotonic()
        recovery = rig.observer.seconds_to_next_delivery(cleared_at, 2 * RECOVERY_LIMIT)
        writers.join()
        rig.deliver_everything(relay.assert_running)
    assert during == 0, f"{during} messages arrived while the broker was blocking publishers"
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="9 broker memory alarm 5s",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,
        recoveries=[recovery],
        rolled_back=writers.rolled_back,
        write_log=writers.log,
    )


def test_unroutable_events_die_hold_their_key_and_arrive_after_requeue(rig: Rig) -> None:
    """Given a queue bound to "ok.#" only, and some keys with one "bad.x" event among "ok"
    ones, when the relay runs, then each bad event is dead after max_attempts, its key's later
    events wait, and every other key completes; when "bad.#" is bound and the dead rows are
    requeued, then everything arrives with per-key order intact."""
    keys, per_key, bad_keys, bad_at = 40, 25, 8, 10
    events: list[Event] = []
    bad: set[str] = set()
    held: set[str] = set()  # events after a bad one, of the same key
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
    settings = rig.settings(max_attempts=3, retry_min=0.1, retry_max=0.3)
    t = rig.box.events
    with QueueTap(rig.amqp_url, prefix="fault-tap-ok") as tap:
        exchange = tap.declare_exchange(unique_name("fault-ex"))
        tap.bind(exchange, "ok.#")
        observer = Observer(tap)
        with rig.relay(settings.replace(exchange=exchange)) as relay:
            # When: every routable event not held back arrives, and the bad ones die.
            routable = {str(e.id) for e in events} - bad - held
            missing = observer.wait_for_ids(routable, idle_timeout=20)
            assert not missing, f"{len(missing)} routable events of free keys did not arrive"
            deadline = time.monotonic() + 20
            while _count(rig, t.c.status == "dead") < bad_keys:
                assert time.monotonic() < deadline, "the unroutable events did not die in 20 s"
                observer.step(0.2)
            observer.watch(1.0)  # a held event published now would be a bug
            relay.assert_running()
            # Then: dead rows hold their keys; nothing held was published.
            assert not held & observer.seen(), "events after a dead one of their key arrived"
            assert _count(rig, t.c.status == "dead", t.c.attempts == 3) == bad_keys
            assert _count(rig, t.c.status == "pending") == len(held)

            # When: the bad events become routable and the dead rows are requeued.
            tap.bind(exchange, "bad.#")
            # Through the product's own requeue (what `outbox-relay dead requeue --all` runs).
            admin = Admin(rig.engine, rig.box)
            requeued = admin.requeue(admin.plan(Selector(everything=True)))
            assert requeued == bad_keys, f"requeued {requeued} dead letters, not {bad_keys}"
            requeued_at = time.monotonic()
            recovery = observer.seconds_to_next_delivery(requeued_at, 2 * RECOVERY_LIMIT)
            observer.wait_for_ids(rig.committed_ids(), idle_timeout=20)
            wait_until_finished(rig.engine, rig.box, timeout=20)
            relay.assert_running()
        deliveries = observer.settle()
    verify(
        rig.engine,
        rig.box,
        deliveries,
        scenario="10 unroutable -> dead -> requeue",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,
        recoveries=[recovery],
        refused=bad,
        write_log=log_of(events),
        notes=f"dead={len(bad)} held={len(held)}",
    )
    f = rig.box.failures
    with rig.engine.connect() as conn:
        failures = conn.execute(
            sa.select(f.c.event_id, sa.func.count()).group_by(f.c.event_id)
        ).all()
    assert {str(i): n for i, n in failures} == dict.fromkeys(bad, 3)


def _count(rig: Rig, *where: sa.ColumnElement[bool]) -> int:
    with rig.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(rig.box.events).where(*where)
        return int(conn.execute(query).scalar_one())
