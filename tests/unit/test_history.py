"""The history checker is the oracle of every fault test, so each verdict is pinned here.

Every test breaks exactly one thing in an otherwise clean history: a checker that blamed
the wrong problem kind (or none) would let a broken relay pass the fault suite.
"""

from __future__ import annotations

import pytest

from tests.support.history import (
    ARRIVAL_SLACK,
    Delivery,
    HistoryReport,
    Redelivery,
    Written,
    check_history,
    check_write_order,
    redeliveries_per_fault,
)


def _events(keys: list[str | None]) -> list[Written]:
    """Events with ids e1, e2, ... and seq 1, 2, ... in write order, keyed as given."""
    return [Written(id=f"e{i}", key=key, seq=i) for i, key in enumerate(keys, start=1)]


def _deliver(events: list[Written], order: list[int] | None = None) -> list[Delivery]:
    """Deliveries of ``events`` (by 0-based index, default all in write order), headers intact."""
    indexes = range(len(events)) if order is None else order
    return [Delivery(events[i].id, events[i].key, events[i].seq) for i in indexes]


EVENTS = _events(["a", "b", "a", None, "b", "a"])


def _only_problem(report: HistoryReport, kind: str) -> None:
    """Assert that ``kind`` is the single problem found, so no verdict hides behind another."""
    problems = {
        "lost": bool(report.lost),
        "unexpected": bool(report.unexpected),
        "duplicates": report.duplicates > 0,
        "reordered": bool(report.reordered),
        "inconsistent": bool(report.inconsistent),
    }
    assert {name for name, found in problems.items() if found} == {kind}
    assert not report.ok()
    with pytest.raises(AssertionError):
        report.assert_ok()


def test_clean_history_is_ok() -> None:
    report = check_history(EVENTS, _deliver(EVENTS))

    assert report == HistoryReport(
        committed=6,
        delivered=6,
        lost=[],
        unexpected=[],
        duplicates=0,
        reordered=[],
        inconsistent=[],
    )
    assert report.ok()
    report.assert_ok()
    assert report.summary() == (
        "committed=6 delivered=6 lost=0 unexpected=0 duplicates=0 reordered=0"
    )


def test_empty_history_is_ok() -> None:
    assert check_history([], []).ok()


def test_keys_may_interleave_in_any_order() -> None:
    # Per-key order only: key b overtaking key a, and the unkeyed event anywhere, are fine.
    report = check_history(EVENTS, _deliver(EVENTS, [1, 4, 3, 0, 2, 5]))

    assert report.ok()


def test_unkeyed_events_are_never_order_checked() -> None:
    events = _events([None, None, None])

    assert check_history(events, _deliver(events, [2, 0, 1])).ok()


def test_lost_event() -> None:
    report = check_history(EVENTS, _deliver(EVENTS, [0, 1, 2, 3, 5]))

    _only_problem(report, "lost")
    assert report.lost == ["e5"]
    assert report.delivered == 5
    # A gap in a key's sequence is loss, not reordering.
    assert report.reordered == []


def test_unexpected_event_from_rolled_back_transaction() -> None:
    deliveries = _deliver(EVENTS)
    deliveries.insert(2, Delivery("ghost", "a", 99))

    report = check_history(EVENTS, deliveries, rolled_back=["ghost"])

    _only_problem(report, "unexpected")
    assert report.unexpected == ["ghost"]
    assert report.delivered == 7


def test_unexpected_event_never_mentioned_anywhere() -> None:
    report = check_history(EVENTS[:-1], _deliver(EVENTS))

    _only_problem(report, "unexpected")
    assert report.unexpected == ["e6"]
    assert report.committed == 5


def test_duplicates_are_counted_and_tolerated_on_request() -> None:
    deliveries = _deliver(EVENTS)
    # A redelivery of old events after everything else: duplicates, not reordering.
    deliveries += [
        Delivery("e1", "a", 1, redelivered=True),
        Delivery("e3", "a", 3),
        Delivery("e1", "a", 1),
    ]

    report = check_history(EVENTS, deliveries)

    _only_problem(report, "duplicates")
    assert report.duplicates == 3
    assert report.delivered == 9
    assert report.ok(max_duplicates=3)
    assert not report.ok(max_duplicates=2)
    assert report.ok(max_duplicates=None)
    report.assert_ok(max_duplicates=None)
    with pytest.raises(AssertionError, match=r"duplicates: 3 > allowed 2"):
        report.assert_ok(max_duplicates=2)


def test_reordered_within_a_key() -> None:
    # e3 (a, seq 3) arrives before e1 (a, seq 1); key b and the rest stay in order.
    report = check_history(EVENTS, _deliver(EVENTS, [2, 1, 0, 3, 4, 5]))

    _only_problem(report, "reordered")
    assert report.reordered == [("a", 1, 3)]
    assert not report.ok(max_duplicates=None)


def test_reordering_is_judged_by_first_delivery_only() -> None:
    # e1 is first delivered late (after e3), then redelivered: reordered once, duplicated once.
    report = check_history(EVENTS, _deliver(EVENTS, [1, 2, 0, 3, 4, 5, 0]))

    assert report.reordered == [("a", 1, 3)]
    assert report.duplicates == 1
    assert report.lost == report.unexpected == report.inconsistent == []


def test_reversed_key_reports_each_late_arrival_against_the_highest_seen() -> None:
    events = _events(["k"] * 4)

    report = check_history(events, _deliver(events, [3, 2, 1, 0]))

    assert report.reordered == [("k", 3, 4), ("k", 2, 4), ("k", 1, 4)]


def test_equal_seqs_within_a_key_are_not_strictly_increasing() -> None:
    events = [Written("x", "k", 7), Written("y", "k", 7)]

    report = check_history(events, _deliver(events))

    assert report.reordered == [("k", 7, 7)]


def test_duplicate_with_different_headers_is_inconsistent() -> None:
    deliveries = _deliver(EVENTS)
    deliveries.append(Delivery("e2", "b", 7))

    report = check_history(EVENTS, deliveries)

    assert report.inconsistent == ["e2"]
    assert report.duplicates == 1
    assert report.lost == report.unexpected == []
    assert report.reordered == []
    assert not report.ok(max_duplicates=None)


def test_duplicate_with_different_key_is_inconsistent() -> None:
    deliveries = _deliver(EVENTS)
    deliveries.append(Delivery("e4", "z", 4))

    report = check_history(EVENTS, deliveries)

    assert report.inconsistent == ["e4"]
    assert not report.ok(max_duplicates=None)


def test_first_delivery_disagreeing_with_commit_is_inconsistent() -> None:
    deliveries = _deliver(EVENTS)
    deliveries[1] = Delivery("e2", None, 2)  # relay dropped the ordering key

    report = check_history(EVENTS, deliveries)

    _only_problem(report, "inconsistent")
    assert report.inconsistent == ["e2"]


def test_order_uses_the_committed_key_not_the_header() -> None:
    # e3 (committed key a) arrives labelled key b after e5 (b, seq 5): one mislabelled
    # message, which must not also be blamed as a reordering of key b.
    deliveries = _deliver(EVENTS, [0, 1, 3, 4, 2, 5])
    deliveries[4] = Delivery("e3", "b", 3)

    report = check_history(EVENTS, deliveries)

    _only_problem(report, "inconsistent")
    assert report.inconsistent == ["e3"]


def test_inconsistent_id_is_listed_once() -> None:
    deliveries = _deliver(EVENTS)
    deliveries[0] = Delivery("e1", "a", 100)
    deliveries += [Delivery("e1", "a", 1), Delivery("e1", "x", 1)]

    report = check_history(EVENTS, deliveries)

    assert report.inconsistent == ["e1"]
    # Ordering uses committed seqs, so the mislabelled seq 100 does not look like a reorder.
    assert report.reordered == []


def test_assert_ok_message_names_problems_and_truncates() -> None:
    events = _events(["k"] * 30)
    deliveries = _deliver(events, list(range(15, 30)))
    deliveries.append(Delivery("ghost", None, 0))

    report = check_history(events, deliveries)

    with pytest.raises(AssertionError) as raised:
        report.assert_ok()
    message = str(raised.value)
    assert "lost=15" in message
    assert "lost (15): e1, e2, e3, e4, e5, e6, e7, e8, e9, e10 ... and 5 more" in message
    assert "e11" not in message
    assert "unexpected, never committed (1): ghost" in message
    assert "reordered" not in message.split("\n", 1)[1]


def test_assert_ok_describes_reordering() -> None:
    report = check_history(EVENTS, _deliver(EVENTS, [2, 0, 1, 3, 4, 5]))

    with pytest.raises(AssertionError, match=r"key='a': seq 3 arrived before seq 1"):
        report.assert_ok()


def test_malformed_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="committed twice"):
        check_history([EVENTS[0], EVENTS[0]], [])
    with pytest.raises(ValueError, match="both committed and rolled back"):
        check_history(EVENTS, [], rolled_back=["e2"])


def test_accepts_one_shot_iterables() -> None:
    report = check_history(iter(EVENTS), iter(_deliver(EVENTS)), rolled_back=iter(["x"]))

    assert report.ok()
    assert report.delivered == 6


def test_large_history_is_linear() -> None:
    # 200k keeps the unit suite fast yet is far out of reach of a quadratic checker
    # (4e10 steps); 1M deliveries take about 2 s to check on a laptop.
    n = 200_000
    events = [Written(str(i), f"k{i % 1000}", i) for i in range(n)]
    deliveries = [Delivery(e.id, e.key, e.seq) for e in events]
    deliveries[10], deliveries[1010] = deliveries[1010], deliveries[10]  # both key k10

    # No timed assertion: a quadratic checker would not finish within the per-test timeout.
    report = check_history(events, deliveries)

    assert report.reordered == [("k10", 10, 1010)]
    assert report.delivered == n


# -- the writers' own log of commit order ---------------------------------------------------------


LOG = {"a": ["e1", "e3", "e6"], "b": ["e2", "e5"]}


def test_write_order_in_log_order_is_clean() -> None:
    deliveries = [Delivery(i, None, 0) for i in ["e1", "e2", "e3", "e5", "e6"]]
    assert check_write_order(LOG, deliveries) == ([], [])


def test_write_order_ignores_header_seq_and_catches_what_seq_would_hide() -> None:
    """The seq in the headers (and in the table) says e6 came first: a numbering bug. The
    log still knows e1 was committed first, so delivering e6 first is reordering."""
    deliveries = [Delivery("e6", "a", 1), Delivery("e1", "a", 2), Delivery("e3", "a", 3)]
    lost, reordered = check_write_order({"a": ["e1", "e3", "e6"]}, deliveries)
    assert lost == []
    assert reordered == [("a", "e1", "e6"), ("a", "e3", "e6")]


def test_write_order_counts_first_deliveries_only_and_ignores_unlogged_ids() -> None:
    deliveries = [Delivery(i, None, 0) for i in ["e1", "probe", "e3", "e1", "e2", "e6", "e3", "e5"]]
    assert check_write_order(LOG, deliveries) == ([], [])


def test_write_order_reports_logged_ids_never_delivered() -> None:
    deliveries = [Delivery(i, None, 0) for i in ["e1", "e3", "e2"]]
    lost, reordered = check_write_order(LOG, deliveries)
    assert lost == ["e6", "e5"]
    assert reordered == []


def test_write_order_rejects_a_malformed_log() -> None:
    with pytest.raises(ValueError, match="logged twice"):
        check_write_order({"a": ["e1"], "b": ["e1"]}, [])


# -- redeliveries charged to the fault that caused them -------------------------------------------


def _stamped(*items: tuple[str, float]) -> tuple[list[Delivery], list[float]]:
    return [Delivery(i, None, 0) for i, _ in items], [t for _, t in items]


def test_redelivery_is_charged_to_the_first_fault_after_the_earlier_delivery() -> None:
    deliveries, arrivals = _stamped(
        ("m1", 1.0), ("m2", 1.1), ("m3", 6.0), ("m1", 3.0), ("m2", 12.0), ("m3", 12.5)
    )
    # m1 and m2 were out before the fault at 2, m3 before the one at 10: m2's late
    # redelivery still belongs to the first fault, not to the one just before it.
    assert redeliveries_per_fault(deliveries, arrivals, [2.0, 10.0]) == ([2, 1], [])


def test_redelivery_with_no_fault_after_the_earlier_delivery_is_unexplained() -> None:
    deliveries, arrivals = _stamped(("m1", 1.0), ("m1", 1.5), ("m2", 5.0), ("m2", 8.0))
    # m1 again before any fault; m2 again after the last fault, which came before its first.
    assert redeliveries_per_fault(deliveries, arrivals, [3.0]) == (
        [0],
        [Redelivery("m1", 1.0, 1.5), Redelivery("m2", 5.0, 8.0)],
    )


def test_a_late_stamp_still_counts_as_before_a_fault_within_the_slack() -> None:
    """The observer stamps an arrival up to a step late: a delivery stamped just after a
    fault may have been on its way before it."""
    deliveries, arrivals = _stamped(("m1", 2.0 + ARRIVAL_SLACK / 2), ("m1", 4.0))
    assert redeliveries_per_fault(deliveries, arrivals, [2.0]) == ([1], [])


def test_third_delivery_is_charged_to_the_fault_after_the_second() -> None:
    deliveries, arrivals = _stamped(("m1", 1.0), ("m1", 3.0), ("m1", 5.0))
    assert redeliveries_per_fault(deliveries, arrivals, [2.0, 4.0]) == ([1, 1], [])


def test_a_fault_that_lasts_covers_earlier_deliveries_that_arrive_while_it_lasts() -> None:
    """A pause from 2 to 6: m1 was on the link when it began and arrived at 3 (past the
    slack), m2 arrived after it ended; m1's redelivery is the pause's, m2's is not."""
    deliveries, arrivals = _stamped(("m1", 3.0), ("m2", 6.8), ("m1", 7.0), ("m2", 7.5))
    assert redeliveries_per_fault(deliveries, arrivals, [2.0], until=[6.0]) == (
        [1],
        [Redelivery("m2", 6.8, 7.5)],
    )
    assert len(redeliveries_per_fault(deliveries, arrivals, [2.0])[1]) == 2


def test_redeliveries_need_a_stamp_per_delivery_and_ordered_faults() -> None:
    deliveries, arrivals = _stamped(("m1", 1.0))
    with pytest.raises(ValueError, match="arrival times"):
        redeliveries_per_fault(deliveries, [], [])
    with pytest.raises(ValueError, match="ascending"):
        redeliveries_per_fault(deliveries, arrivals, [2.0, 1.0])
    with pytest.raises(ValueError, match="an end"):
        redeliveries_per_fault(deliveries, arrivals, [2.0], until=[1.0])
