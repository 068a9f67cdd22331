"""The demo's verdict on the consumer side: each check fails when what it checks breaks.

The end-to-end run (`tests/e2e/test_cli.py::test_demo_delivers_and_applies_...`) shows the
checks passing on the real services; these show that they are not a foregone conclusion.
"""

from __future__ import annotations

import dataclasses

from outbox import Event
from outbox.consumer import Outcome
from relay.demo import STOCK_START, Applied, Arrival, DemoReport, Processed, Written, render


def written() -> list[Written]:
    return [
        Written(id="p1", key="order:1", seq=1, type="order.placed"),
        Written(id="p2", key="order:2", seq=2, type="order.placed"),
        Written(id="s1", key="order:1", seq=3, type="order.shipped"),
    ]


def good_report() -> DemoReport:
    events = written()
    return DemoReport(
        database_url="postgresql://x/y",
        schema="s",
        exchange="ex",
        queue="ex",
        written=tuple(events),
        rolled_back=(Event(type="order.cancelled", payload={}, key="order:1"),),
        arrivals=tuple(Arrival(w.id, w.key, w.seq, w.type, False) for w in events),
        relay_seconds=0.1,
        group="ex",
        group_queues=("ex.0",),
        processed=(
            *(Processed(w.id, w.key, w.seq, w.type, Outcome.HANDLED) for w in events),
            Processed("p1", "order:1", 1, "order.placed", Outcome.DUPLICATE),
        ),
        applied=(
            Applied("stock", "p2", "order:2", 2, "demo-widget -1"),
            Applied("stock", "p1", "order:1", 1, "demo-widget -1"),
            Applied("email", "s1", "order:1", 3, "email: shipped"),
        ),
        duplicate_id="p1",
        stock_left=STOCK_START - 2,
        consumer_seconds=0.1,
    )


def test_a_consistent_run_passes_and_says_so() -> None:
    report = good_report()
    assert report.ok
    text = "\n".join(render(report))
    assert "applied      3 of 3 committed events, each once" in text
    assert "apply order  OK: in write order per key" in text
    assert "duplicate    message p1 published again: skipped, applied once" in text
    assert "result       OK" in text


def test_a_duplicate_applied_twice_fails() -> None:
    report = good_report()
    twice = dataclasses.replace(
        report,
        applied=(*report.applied, Applied("stock", "p1", "order:1", 1, "demo-widget -1")),
        processed=tuple(dataclasses.replace(p, outcome=Outcome.HANDLED) for p in report.processed),
        stock_left=STOCK_START - 3,
    )
    assert twice.applied_twice == ["p1"] and not twice.duplicate_skipped and not twice.stock_ok
    assert not twice.ok
    text = "\n".join(render(twice))
    assert "1 APPLIED TWICE" in text and "NOT SKIPPED AS A DUPLICATE" in text
    assert "FAILED (consumption)" in text


def test_effects_out_of_key_order_fail() -> None:
    report = good_report()
    swapped = dataclasses.replace(
        report, applied=(report.applied[2], report.applied[0], report.applied[1])
    )
    assert swapped.applied_out_of_order == ["order:1"] and not swapped.ok
    assert "apply order  BROKEN for order:1" in "\n".join(render(swapped))


def test_a_missing_effect_and_an_uncommitted_one_fail() -> None:
    report = good_report()
    leaked = dataclasses.replace(
        report,
        applied=(
            *report.applied[:2],
            Applied("stock", "cancel", "order:1", 9, "demo-widget 1"),
        ),
    )
    assert [w.id for w in leaked.not_applied] == ["s1"]
    assert [a.message_id for a in leaked.applied_unexpected] == ["cancel"]
    assert not leaked.ok
    text = "\n".join(render(leaked))
    assert "1 NEVER COMMITTED APPLIED" in text and "1 NOT APPLIED" in text


def test_no_duplicate_injected_fails() -> None:
    report = dataclasses.replace(good_report(), duplicate_id=None)
    assert not report.ok
    assert "NOT INJECTED" in "\n".join(render(report))
