"""The fault rig's own parts, each tested before the scenarios trust it: the invariant checks
(each one shown to fail on the violation it names), the arrival observer, the hold point and
the gate that stall a relay's thread at a chosen moment, and the writer threads with their
log of commit order.
"""

from __future__ import annotations

import threading
import time

import pika
import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from tests.faults.invariants import (
    CHECKS,
    RECOVERY_LIMIT,
    Fault,
    RowState,
    check_scenario,
    fault_duplicates_problem,
    final_status_problem,
    recovery_problem,
    spent_attempts_problem,
    unacked_problem,
    verify,
)
from tests.faults.load import Writers
from tests.faults.observe import Observer
from tests.faults.processes import drain_unstamped
from tests.faults.runners import CallGate, HoldPoint
from tests.support.history import ARRIVAL_SLACK, Delivery
from tests.support.rabbit import QueueTap
from tests.support.relays import interleaved_events, write_events, written

PUBLISHED, DEAD, PENDING = (RowState(s, 0, 0) for s in ("published", "dead", "pending"))


# -- the checks, one violation at a time ----------------------------------------------------------


def test_final_status_wants_published_or_the_named_dead() -> None:
    assert final_status_problem({"a": PUBLISHED, "b": DEAD}, dead={"b"}) is None
    assert "rows not in their final state" in str(final_status_problem({"a": PENDING}, ()))
    assert final_status_problem({"a": DEAD}, dead=()) is not None  # dead, not expected
    assert final_status_problem({"b": PUBLISHED}, dead={"b"}) is not None  # should be dead


def test_spent_attempts_allowed_only_on_refused_rows() -> None:
    tried, with_history = RowState("published", 2, 0), RowState("published", 0, 1)
    assert spent_attempts_problem({"a": tried, "b": PUBLISHED}, refused={"a"}) is None
    assert spent_attempts_problem({"a": tried}, refused=()) is not None
    assert spent_attempts_problem({"a": with_history}, refused=()) is not None


def test_published_rows_must_have_been_delivered() -> None:
    assert unacked_problem({"a": PUBLISHED, "b": DEAD}, delivered={"a"}) is None
    problem = unacked_problem({"a": PUBLISHED}, delivered=set())
    assert problem is not None and "'a'" in problem


def test_recovery_within_the_limit_or_it_fails() -> None:
    assert recovery_problem([0.5, RECOVERY_LIMIT - 0.1]) is None
    assert recovery_problem([]) is None
    assert recovery_problem([0.5, None]) is not None  # never recovered
    assert recovery_problem([RECOVERY_LIMIT]) is not None


def test_duplicates_per_fault_bound_each_fault_on_its_own() -> None:
    deliveries = [Delivery(i, None, 0) for i in ["m1", "m2", "m1", "m2", "m3", "m3"]]
    arrivals = [1.0, 1.0, 3.0, 3.0, 6.0, 12.0]
    faults = [Fault(2.0, 2, "reset"), Fault(10.0, 1, "kill")]
    assert fault_duplicates_problem(deliveries, arrivals, faults) is None
    # The same three duplicates within a total bound of 3, but two of them after a fault
    # allowed one: caught.
    tight = [Fault(2.0, 1, "reset"), Fault(10.0, 2, "kill")]
    problem = fault_duplicates_problem(deliveries, arrivals, tight)
    assert problem is not None and "reset #1: 2 > 1" in problem
    # A duplicate no fault explains.
    assert fault_duplicates_problem(deliveries[:3], [1.0, 1.0, 1.5], faults) is not None


def _rows(engine: sa.Engine, box: Outbox, count: int) -> list[str]:
    events = interleaved_events(count, keys=2)
    write_events(engine, box, events)
    return [str(e.id) for e in events]


def _deliveries(engine: sa.Engine, box: Outbox, order: list[int] | None = None) -> list[Delivery]:
    rows = written(engine, box)
    chosen = range(len(rows)) if order is None else order
    return [Delivery(rows[i].id, rows[i].key, rows[i].seq) for i in chosen]


def _publish_all(engine: sa.Engine, box: Outbox) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(box.events).values(status="published"))


def test_check_scenario_passes_a_clean_run_and_names_each_violation(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """On a real table: a clean run has no findings; each broken variant fails exactly the
    checks it breaks."""
    box = outbox_schema
    ids = _rows(pg_engine, box, 6)
    log = {"k0": [ids[0], ids[2], ids[4]], "k1": [ids[1], ids[3], ids[5]]}
    assert set(CHECKS) >= {"lost", "write log order", "final status"}

    def failed(deliveries: list[Delivery], **kwargs: object) -> set[str]:
        options: dict[str, object] = {"max_duplicates": 0, "write_log": log, **kwargs}
        return check_scenario(pg_engine, box, deliveries, **options).failed  # type: ignore[arg-type]

    assert failed(_deliveries(pg_engine, box)) == {"final status"}  # rows still pending
    _publish_all(pg_engine, box)
    clean = _deliveries(pg_engine, box)
    assert failed(clean) == set()
    assert failed(clean[1:]) == {"lost", "write log lost", "published never delivered"}
    assert failed([clean[2], *clean[:2], *clean[3:]]) == {"reordered", "write log order"}
    assert failed([*clean, clean[0]]) == {"duplicates"}
    assert failed([*clean, clean[0]], max_duplicates=1) == set()
    assert failed([*clean, Delivery("stray", "k0", 99)]) == {"unexpected"}
    assert failed(clean, recoveries=[None]) == {"recovery"}
    assert failed(clean, dead={ids[0]}) == {"final status"}
    assert failed(clean, rolled_back=[ids[0]]) >= {"rolled back in outbox", "unexpected"}
    # The writers' log disagrees with seq (a numbering bug): only the log sees it.
    swapped = {"k0": [ids[2], ids[0], ids[4]], "k1": log["k1"]}
    assert failed(clean, write_log=swapped) == {"write log order"}
    with pytest.raises(ValueError, match="arrival"):
        failed(clean, faults=[Fault(1.0, 0)])


def test_verify_records_then_fails_naming_the_checks(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    _rows(pg_engine, outbox_schema, 4)
    _publish_all(pg_engine, outbox_schema)
    recorded: list[object] = []
    deliveries = _deliveries(pg_engine, outbox_schema, order=[0, 1, 2])
    with pytest.raises(AssertionError, match=r"\[lost\].*\n.*\[published never delivered\]"):
        verify(
            pg_engine,
            outbox_schema,
            deliveries,
            scenario="broken",
            started=time.monotonic(),
            record=recorded.append,
            max_duplicates=0,
        )
    assert len(recorded) == 1  # recorded before the assertion


# -- the observer --------------------------------------------------------------------------------


def _publish(amqp_url: str, queue: str, ids: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for message_id in ids:
            headers = {"ordering-key": "k", "outbox-seq": 1}
            properties = pika.BasicProperties(message_id=message_id, headers=headers)
            channel.basic_publish("", queue, b"{}", properties)
    finally:
        connection.close()


def test_observer_stamps_arrivals_and_finds_deliveries_after_a_moment(amqp_url: str) -> None:
    with QueueTap(amqp_url, prefix="rig-tap") as tap:
        observer = Observer(tap)
        assert observer.step(0.05) == 0
        _publish(amqp_url, tap.queue, ["a", "b"])
        observer.wait_for_count(2, timeout=10)
        first_batch = max(observer.arrivals)
        between = time.monotonic()
        assert observer.seconds_to_next_delivery(between, timeout=0.3) is None
        _publish(amqp_url, tap.queue, ["c", "a"])
        assert observer.wait_for_ids({"c"}, idle_timeout=10) == set()
        waited = observer.seconds_until_delivered("c", between, timeout=10)
        assert waited is not None and waited > 0
        observer.settle(idle=0.3)
        assert observer.count == 4 and len(observer.arrivals) == 4
        assert observer.arrivals == sorted(observer.arrivals)
        assert observer.arrivals[1] == first_batch < observer.arrivals[2]
        assert observer.seen() == {"a", "b", "c"}
        assert [d.message_id for d in observer.deliveries] == ["a", "b", "c", "a"]
        with pytest.raises(AssertionError, match="only 4 of 5"):
            observer.wait_for_count(5, timeout=0.3)


def test_a_kill_lasts_until_what_the_dead_relay_sent_is_stamped(amqp_url: str) -> None:
    """What a relay sent just before its kill is stamped only when the test next looks: a
    slow kill makes the stamp late, past the slack, and the next relay's redelivery looks
    unexplained unless the kill lasts until `drain_unstamped` has stamped it."""
    with QueueTap(amqp_url, prefix="rig-kill") as tap:
        observer = Observer(tap)
        _publish(amqp_url, tap.queue, ["a"])  # the dead relay's last message
        killed_at = time.monotonic()
        time.sleep(ARRIVAL_SLACK + 0.3)  # the kill and the reaping, while nobody looks
        until = drain_unstamped(observer)
        assert observer.count == 1 and observer.arrivals[0] > killed_at + ARRIVAL_SLACK
        _publish(amqp_url, tap.queue, ["a"])  # the next relay sends it again
        observer.settle(idle=0.3)
        deliveries, arrivals = observer.deliveries, observer.arrivals
    assert len(deliveries) == 2
    lasting = Fault(killed_at, 1, "SIGKILL", until=until)
    assert fault_duplicates_problem(deliveries, arrivals, [lasting]) is None
    instant = Fault(killed_at, 1, "SIGKILL")
    assert "1 redeliveries after no fault" in str(
        fault_duplicates_problem(deliveries, arrivals, [instant])
    )


# -- holding a relay's thread --------------------------------------------------------------------


def claim(engine: sa.Engine) -> int:
    """Stands in for the relay's method of that name: a transaction on `engine`."""
    with engine.begin() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def test_hold_point_holds_the_thread_at_the_event_within_the_named_function(
    pg_url: str,
) -> None:
    engine = sa.create_engine(pg_url)
    try:
        hold = HoldPoint(engine, "commit", within="claim")
        with engine.begin() as conn:  # not within "claim": goes straight through
            conn.execute(sa.text("SELECT 1"))
        hold.arm()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(claim(engine)))
        thread.start()
        hold.wait_held(timeout=10)
        thread.join(0.2)
        assert thread.is_alive() and not result, "the held thread went on"
        hold.release()
        thread.join(10)
        assert result and hold.held_pid == result[0]
        claim(engine)  # disarmed after one hold: passes
        hold.arm()
        with pytest.raises(RuntimeError, match="no thread reached"):
            hold.wait_held(timeout=0.2)
        hold.close()
    finally:
        engine.dispose()


def test_call_gate_holds_the_first_call_before_it_runs() -> None:
    class Store:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def mark(self, n: int) -> int:
            self.calls.append(n)
            return n * 2

    store = Store()
    gate = CallGate(store, "mark")
    assert store.mark(1) == 2  # not armed
    gate.arm()
    thread = threading.Thread(target=store.mark, args=(5,))
    thread.start()
    gate.wait_held(timeout=10)
    assert gate.args == (5,) and store.calls == [1], "the held call already ran"
    gate.release()
    gate.wait_done(timeout=10)
    thread.join(10)
    assert store.calls == [1, 5] and gate.result == 10
    assert store.mark(2) == 4  # once only
    gate.close()


# -- the writer threads --------------------------------------------------------------------------


def test_writers_log_their_commits_in_the_order_of_the_table(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Four threads on five shared keys, a third of the transactions rolled back: the log
    holds exactly the committed events, and each key's log is in the table's order (the key
    lock orders writers of a key by commit, and so does the log)."""
    with Writers(
        pg_engine, outbox_schema, total=600, keys=5, rollback_share=0.3, seed=31
    ) as writers:
        writers.join()
    rows = written(pg_engine, outbox_schema)
    by_key: dict[str, list[str]] = {}
    for row in rows:
        assert row.key is not None
        by_key.setdefault(row.key, []).append(row.id)
    assert writers.rolled_back and writers.committed == len(rows)
    assert writers.committed + len(writers.rolled_back) == 600
    assert writers.log == by_key
    assert not set(writers.rolled_back) & {r.id for r in rows}


def test_writers_report_their_errors(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    def broken(*_: object) -> Event:
        raise RuntimeError("cannot make an event")

    writers = Writers(pg_engine, outbox_schema, total=10, keys=1, threads=1, make_event=broken)
    writers.start()
    with pytest.raises(RuntimeError, match="cannot make an event"):
        writers.join(timeout=10)
