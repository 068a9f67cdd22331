"""A relay given every node of a three-node RabbitMQ cluster, publishing to a quorum queue,
while nodes go away (issue 16). After each scenario the fault suite's checker
(tests/faults/invariants.py) holds: nothing lost, nothing rolled back delivered, per-key order,
duplicates within one in-flight window per lost connection, no attempt spent.

Recovery is measured from the moment the fault began (a node stopped or killed) or healed
(the majority back) to the delivery of an event committed at that moment."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from outbox import Event
from tests.cluster.conftest import ClusterRig
from tests.cluster.nodes import MAX_MESSAGE_SIZE
from tests.faults.invariants import RECOVERY_LIMIT, row_states, verify
from tests.faults.load import Writers
from tests.faults.runners import RelayProcess
from tests.support.rabbit import unique_name
from tests.support.relays import write_events, written

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

EVENTS = 1500
RATE = 400  # events per second: the writes span the fault


def probe(rig: ClusterRig, since: float, timeout: float = 2 * RECOVERY_LIMIT) -> float | None:
    """Commit an event of a fresh key now; seconds from `since` until it is delivered."""
    event = Event(type="order.probe", key=unique_name("probe"))
    write_events(rig.engine, rig.box, [event])
    return rig.observer.seconds_until_delivered(str(event.id), since, timeout)


def test_relays_node_stopped_mid_stream_then_started_again(cluster_rig: ClusterRig) -> None:
    """Given a relay on the first node of the list, when that node is stopped mid-stream, then
    the relay moves to the next node, and nothing is lost; when the node comes back, nothing
    changes for the relay (it stays where it is)."""
    rig = cluster_rig
    settings = rig.settings()
    with (
        Writers(rig.engine, rig.box, total=EVENTS, keys=50, rate=RATE, seed=161) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(200, timeout=30)
        node = rig.node_of(relay)
        assert node is rig.cluster.nodes[0], "the relay is not on the first node that answers"
        stopped_at = time.monotonic()
        node.stop()
        moved_to = rig.wait_connected_elsewhere(relay, node, timeout=30)
        recovery = probe(rig, stopped_at)
        relay.assert_running()
        node.start()
        writers.join()
        rig.observer.wait_for_ids(_committed(rig), idle_timeout=20)
        relay.assert_running()
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="16 relay's node stopped, restarted",
        started=rig.started,
        record=rig.record,
        max_duplicates=settings.max_in_flight,
        recoveries=[recovery],
        notes=f"moved {node.label} -> {moved_to.label}",
    )


def test_relays_node_sigkilled(cluster_rig: ClusterRig) -> None:
    """Given a relay on a node, when that node's VM is SIGKILLed (no connection close, no
    goodbye), then the relay moves to another node and nothing is lost."""
    rig = cluster_rig
    settings = rig.settings()
    with (
        Writers(rig.engine, rig.box, total=EVENTS, keys=50, rate=RATE, seed=162) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(200, timeout=30)
        node = rig.node_of(relay)
        assert node is not rig.tap_node
        killed_at = time.monotonic()
        node.kill()
        moved_to = rig.wait_connected_elsewhere(relay, node, timeout=30)
        recovery = probe(rig, killed_at)
        relay.assert_running()
        node.start()
        writers.join()
        rig.observer.wait_for_ids(_committed(rig), idle_timeout=20)
        relay.assert_running()
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="16 relay's node SIGKILLed",
        started=rig.started,
        record=rig.record,
        max_duplicates=settings.max_in_flight,
        recoveries=[recovery],
        notes=f"moved {node.label} -> {moved_to.label}",
    )


def test_minority_down_confirms_keep_coming(cluster_rig: ClusterRig) -> None:
    """Given a relay on one node, when another node (a minority: one of three) is down, then
    the quorum queue still has a majority: confirms keep coming, the relay stays where it is,
    and no publish waits for the missing node."""
    rig = cluster_rig
    settings = rig.settings()
    with (
        Writers(rig.engine, rig.box, total=EVENTS, keys=50, rate=RATE, seed=163) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(200, timeout=30)
        relays_node = rig.node_of(relay)
        down = next(n for n in rig.cluster.nodes if n not in (relays_node, rig.tap_node))
        down.stop()
        down_at = time.monotonic()
        recovery = probe(rig, down_at)
        # Events committed while the node is down are confirmed (marked published) while it
        # is still down: a majority of the queue's replicas took them.
        # Keys of their own, in key order: the writers' transactions take key locks in key
        # order too, so the two can never deadlock.
        keys = sorted(unique_name("minority") for _ in range(10))
        while_down = [Event(type="order.placed", key=key) for key in keys for _ in range(10)]
        write_events(rig.engine, rig.box, while_down)
        ids = {str(e.id) for e in while_down}
        assert not rig.observer.wait_for_ids(ids, idle_timeout=10), "not delivered"
        _wait_published(rig, ids)
        assert rig.node_of(relay) is relays_node
        assert not down.running()
        down.start()
        writers.join()
        rig.observer.wait_for_ids(_committed(rig), idle_timeout=20)
        relay.assert_running()
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="16 minority (1 of 3) down",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,  # the relay's connection never broke
        recoveries=[recovery],
        notes=f"{down.label} down; 100 events committed and confirmed while it was",
    )


def test_majority_down_relay_waits_loses_nothing_and_resumes(cluster_rig: ClusterRig) -> None:
    """Given a relay publishing, when two of three nodes are down (the quorum queue has no
    majority, so no confirm can come), then the relay waits: it keeps its results and its
    leases, marks nothing published, and once a majority is back everything arrives."""
    rig = cluster_rig
    settings = rig.settings()
    with (
        Writers(rig.engine, rig.box, total=EVENTS, keys=50, rate=RATE, seed=164) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(200, timeout=30)
        down = [n for n in rig.cluster.nodes if n is not rig.tap_node]
        for node in down:
            node.stop()
        outage_started = time.monotonic()
        published_before = _published(rig)
        # The relay keeps trying; the writers keep committing; no confirm can come.
        during = rig.observer.watch(3.0)
        relay.assert_running()
        outage_s = time.monotonic() - outage_started
        marked_during = _published(rig) - published_before
        down[0].start()  # two of three: a majority again
        healed_at = time.monotonic()
        recovery = probe(rig, healed_at)
        down[1].start()
        writers.join()
        rig.observer.wait_for_ids(_committed(rig), idle_timeout=20)
        relay.assert_running()
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="16 majority (2 of 3) down",
        started=rig.started,
        record=rig.record,
        max_duplicates=2 * settings.max_in_flight,
        recoveries=[recovery],
        notes=f"no majority for {outage_s:.1f}s: {marked_during} rows marked published "
        f"meanwhile, {during} delivered from the queue's backlog",
    )


def _committed(rig: ClusterRig) -> set[str]:
    return {w.id for w in written(rig.engine, rig.box)}


def _published(rig: ClusterRig) -> int:
    return sum(s.status == "published" for s in row_states(rig.engine, rig.box).values())


def _wait_published(rig: ClusterRig, ids: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = row_states(rig.engine, rig.box)
        if all(states[i].status == "published" for i in ids):
            return
        if time.monotonic() > deadline:
            raise AssertionError("events committed while a minority was down not published")
        rig.observer.step()


def test_a_poison_message_costs_one_event_not_the_window(cluster_rig: ClusterRig) -> None:
    """Given a broker with a 64 KiB max_message_size (below the relay's default) and a stream of
    events, when an event's body is larger (twice), then that event alone is dead after a
    single attempt (no retry can help), naming the limit, and every other event is published
    without spending an attempt, although the first one closed the channel they shared.
    (That the second is refused before it is sent: test_cluster_publisher.py.)"""
    rig = cluster_rig
    settings = rig.settings()
    poison = [
        Event(type="order.huge", key=unique_name("huge"), payload={"blob": "x" * MAX_MESSAGE_SIZE})
        for _ in range(2)
    ]
    with (
        Writers(rig.engine, rig.box, total=EVENTS, keys=50, rate=RATE, seed=165) as writers,
        rig.relay(settings) as relay,
    ):
        rig.observer.wait_for_count(200, timeout=30)
        write_events(rig.engine, rig.box, poison[:1])
        rig.observer.watch(0.5)
        write_events(rig.engine, rig.box, poison[1:])
        writers.join()
        ids = _committed(rig) - {str(e.id) for e in poison}
        rig.observer.wait_for_ids(ids, idle_timeout=20)
        _wait_published(rig, ids)
        relay.assert_running()
    states = row_states(rig.engine, rig.box)
    for event in poison:
        state = states[str(event.id)]
        assert (state.status, state.attempts, state.failures) == ("dead", 1, 1), state
    with rig.engine.connect() as conn:
        t = rig.box.events
        errors = conn.execute(sa.select(t.c.last_error).where(t.c.type == "order.huge")).scalars()
        assert all(f"max_message_size of {MAX_MESSAGE_SIZE} bytes" in e for e in errors)
    # Nothing else is left to check on them; the checker looks at everything else.
    with rig.engine.begin() as conn:
        for table in (rig.box.failures, rig.box.events):
            key = table.c.event_id if table is rig.box.failures else table.c.id
            conn.execute(sa.delete(table).where(key.in_([e.id for e in poison])))
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="12.5 poison message (too large)",
        started=rig.started,
        record=rig.record,
        max_duplicates=settings.max_in_flight,  # those that shared the closed channel
        notes="2 events over the broker's max_message_size: dead after 1 attempt each",
    )


def test_relay_process_given_the_node_list_by_variable_moves_and_says_where(
    cluster_rig: ClusterRig,
) -> None:
    """`outbox-relay run` with OUTBOX_AMQP_URL listing every node: when its node stops, the
    process logs the node it moved to, keeps delivering, and exits 0 on SIGTERM."""
    rig = cluster_rig
    first, second = rig.cluster.nodes[0], rig.cluster.nodes[1]
    relay = RelayProcess(
        database_url=rig.pg_url,
        amqp_url=rig.cluster.urls(),
        schema=str(rig.box.schema),
        exchange=rig.exchange,
        name=unique_name("relay"),
        extra=["--poll-interval", "0.2s"],
    )
    try:
        write_events(rig.engine, rig.box, [Event(type="order.placed", key="a")])
        rig.observer.wait_for_count(1, timeout=30)
        _wait_for_output(relay, f"connected to node {first.label}")
        stopped_at = time.monotonic()
        first.stop()
        recovery = probe(rig, stopped_at)
        _wait_for_output(relay, f"connected to node {second.label}")
        relay.assert_running()
        first.start()
    finally:
        code = relay.stop()
    assert code == 0, relay.output[-3000:]
    verify(
        rig.engine,
        rig.box,
        rig.observer.settle(),
        scenario="16 relay process, node stopped",
        started=rig.started,
        record=rig.record,
        max_duplicates=0,  # nothing was in flight when the node stopped
        recoveries=[recovery],
        notes=f"moved {first.label} -> {second.label}",
    )


def _wait_for_output(relay: RelayProcess, text: str, timeout: float = 10.0) -> None:
    """The process's output is read by a thread: a line may land a moment after its effect."""
    deadline = time.monotonic() + timeout
    while text not in relay.output:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the relay's output:\n{relay.output[-3000:]}")
        time.sleep(0.05)
