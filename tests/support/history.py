"""Check a delivery history against what was committed, like Jepsen's total-queue checker.

Fault tests cannot assert on "what the relay did" step by step: under crashes, broker
restarts and killed connections the only trustworthy facts are what the application
committed to the outbox and what a consumer finally observed. This module compares those
two sets and names every way they can disagree (lost, unexpected, duplicated, reordered,
inconsistent), so a test can state precisely which guarantees it expects: at-least-once
delivery allows duplicates but never loss, per-key order forbids reordering within a key.

Pure Python and O(n) so the same checker serves unit tests and million-message soak runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

#: How many items of each problem kind a failure message shows; the counts are always complete.
_SHOWN = 10

#: Seconds an arrival stamp may lag the delivery it records (the observer's step, and more).
ARRIVAL_SLACK = 0.5


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the consumer received it, in arrival order.

    ``key`` and ``seq`` come from the ``ordering-key`` and ``outbox-seq`` headers rather than
    from the committed rows, because the checker must catch a relay that labels a message
    with the wrong key or sequence number.
    """

    message_id: str
    key: str | None
    seq: int
    redelivered: bool = False


@dataclass(frozen=True, slots=True)
class Written:
    """One event the application committed: the ground truth deliveries are compared with."""

    id: str
    key: str | None
    seq: int


@dataclass(frozen=True)
class HistoryReport:
    """Everything that differs between the committed events and the deliveries.

    Lists keep a deterministic order (``lost`` in commit order, the others in arrival order)
    so that failure messages are reproducible and readable.
    """

    committed: int
    delivered: int
    lost: list[str]
    unexpected: list[str]
    duplicates: int
    reordered: list[tuple[str, int, int]]
    inconsistent: list[str]

    def ok(self, max_duplicates: int | None = 0) -> bool:
        """True when the history meets the guarantees; ``None`` allows any number of duplicates.

        Duplicates are a separate knob because at-least-once delivery legitimately produces
        them after a crash, while loss, phantom events, reordering and mislabelled messages
        are never acceptable.
        """
        if self.lost or self.unexpected or self.reordered or self.inconsistent:
            return False
        return max_duplicates is None or self.duplicates <= max_duplicates

    def summary(self) -> str:
        """One line of counts, for logs and benchmark output."""
        return (
            f"committed={self.committed} delivered={self.delivered} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} duplicates={self.duplicates} "
            f"reordered={len(self.reordered)}"
        )

    def assert_ok(self, max_duplicates: int | None = 0) -> None:
        """Raise AssertionError naming the first few instances of every problem found."""
        if self.ok(max_duplicates):
            return
        lines = [f"delivery history violates guarantees: {self.summary()}"]
        if self.lost:
            lines.append(f"  lost ({len(self.lost)}): {_head(self.lost)}")
        if self.unexpected:
            lines.append(
                f"  unexpected, never committed ({len(self.unexpected)}): {_head(self.unexpected)}"
            )
        if max_duplicates is not None and self.duplicates > max_duplicates:
            lines.append(f"  duplicates: {self.duplicates} > allowed {max_duplicates}")
        if self.reordered:
            shown = ", ".join(
                f"key={key!r}: seq {later} arrived before seq {earlier}"
                for key, earlier, later in self.reordered[:_SHOWN]
            )
            more = _more(self.reordered)
            lines.append(f"  reordered ({len(self.reordered)}): {shown}{more}")
        if self.inconsistent:
            lines.append(
                f"  inconsistent key/seq ({len(self.inconsistent)}): {_head(self.inconsistent)}"
            )
        raise AssertionError("\n".join(lines))


def _more(items: list[str] | list[tuple[str, int, int]]) -> str:
    return f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


def _head(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + _more(items)


def check_history(
    committed: Iterable[Written],
    deliveries: Iterable[Delivery],
    rolled_back: Iterable[str] = (),
) -> HistoryReport:
    """Compare committed events with deliveries (given in arrival order).

    * lost: committed, never delivered.
    * unexpected: delivered, never committed (e.g. an event from a rolled-back transaction).
    * duplicates: deliveries beyond the first of each id.
    * inconsistent: ids where some delivery carried a different key or seq than the first
      delivery, or where the first delivery disagrees with the committed event. Either means
      the relay mislabelled a message, which would silently break per-key ordering.
    * reordered: for every key except ``None``, the first deliveries must arrive in strictly
      increasing ``seq`` (write order). Only first deliveries count, because a redelivery of
      an old message after a crash is a duplicate, not a reordering. Each out-of-order arrival
      is reported once, as ``(key, its seq, highest seq of that key already seen)``, which
      keeps the check O(n) even for a fully reversed history. Order uses the committed key
      and seq, so a mislabelled message is reported as inconsistent, not as reordered.

    ``rolled_back`` lists ids the test knows were rolled back. Delivering them is reported
    as unexpected like any other uncommitted id; the argument only guards against a broken
    test that claims an id was both committed and rolled back (ValueError).
    """
    written: dict[str, Written] = {}
    for event in committed:
        if event.id in written:
            raise ValueError(f"event {event.id} committed twice: the history is malformed")
        written[event.id] = event
    both = [event_id for event_id in rolled_back if event_id in written]
    if both:
        raise ValueError(f"ids both committed and rolled back: {both[:_SHOWN]}")

    first: dict[str, Delivery] = {}
    unexpected: list[str] = []
    inconsistent: list[str] = []
    inconsistent_seen: set[str] = set()
    reordered: list[tuple[str, int, int]] = []
    highest_seq: dict[str, int] = {}
    duplicates = 0
    delivered = 0

    for delivery in deliveries:
        delivered += 1
        message_id = delivery.message_id
        earlier = first.get(message_id)
        if earlier is not None:
            duplicates += 1
            if (delivery.key != earlier.key or delivery.seq != earlier.seq) and (
                message_id not in inconsistent_seen
            ):
                inconsistent_seen.add(message_id)
                inconsistent.append(message_id)
            continue
        first[message_id] = delivery
        truth = written.get(message_id)
        if truth is None:
            unexpected.append(message_id)
            continue
        if (delivery.key != truth.key or delivery.seq != truth.seq) and (
            message_id not in inconsistent_seen
        ):
            inconsistent_seen.add(message_id)
            inconsistent.append(message_id)
        key = truth.key
        if key is None:
            continue
        highest = highest_seq.get(key)
        if highest is None or truth.seq > highest:
            highest_seq[key] = truth.seq
        else:
            reordered.append((key, truth.seq, highest))

    lost = [event_id for event_id in written if event_id not in first]
    return HistoryReport(
        committed=len(written),
        delivered=delivered,
        lost=lost,
        unexpected=unexpected,
        duplicates=duplicates,
        reordered=reordered,
        inconsistent=inconsistent,
    )


def check_write_order(
    log: Mapping[str, Sequence[str]], deliveries: Iterable[Delivery]
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Check deliveries against the writers' own record of what they committed.

    ``log`` maps each key to the ids its writers committed, in commit order (and, within a
    transaction, in the order they were written). It is kept by the writers themselves, so it
    does not depend on the database's ``seq``: a numbering bug that put a key's rows in the
    wrong order would fool ``check_history`` (which orders by ``seq``) but not this check.

    Returns ``(lost, reordered)``: logged ids never delivered (in log order), and each first
    delivery that arrived after a later logged event of its key, as ``(key, its id, the later
    id already delivered)``. Deliveries of ids the log does not name are ignored here
    (``check_history`` judges them).
    """
    position: dict[str, tuple[str, int]] = {}
    for key, ids in log.items():
        for index, event_id in enumerate(ids):
            if event_id in position:
                raise ValueError(f"event {event_id} logged twice: the write log is malformed")
            position[event_id] = (key, index)
    seen: set[str] = set()
    highest: dict[str, tuple[int, str]] = {}
    reordered: list[tuple[str, str, str]] = []
    for delivery in deliveries:
        event_id = delivery.message_id
        where = position.get(event_id)
        if where is None or event_id in seen:
            continue
        seen.add(event_id)
        key, index = where
        best = highest.get(key)
        if best is None or index > best[0]:
            highest[key] = (index, event_id)
        else:
            reordered.append((key, event_id, best[1]))
    lost = [i for ids in log.values() for i in ids if i not in seen]
    return lost, reordered


@dataclass(frozen=True, slots=True)
class Redelivery:
    """A message seen again: when its previous copy arrived, and when this one did."""

    message_id: str
    before: float
    at: float


def redeliveries_per_fault(
    deliveries: Sequence[Delivery],
    arrivals: Sequence[float],
    faults: Sequence[float],
    *,
    until: Sequence[float] | None = None,
) -> tuple[list[int], list[Redelivery]]:
    """Charge every redelivery to the fault that caused it; returns (per fault, unexplained).

    A message is delivered again only when a fault cut off the record of its earlier
    delivery (a confirm lost with a connection, a relay killed before writing its result).
    That fault came after the earlier delivery was published, so each redelivery is charged
    to the first fault (monotonic times, `faults` ascending) after the *previous* delivery of
    the same id. `arrivals[i]` is when `deliveries[i]` was seen; a stamp may be late by the
    observer's step, so a fault up to `ARRIVAL_SLACK` seconds before a stamp still counts as
    after it. A fault that lasts (a paused relay) ends at `until[i]`: an earlier delivery
    that arrives while it lasts may have been published before it began (it was on the
    link), so the fault counts as after it too. A redelivery with no fault after its previous
    delivery is unexplained.
    """
    if len(arrivals) != len(deliveries):
        raise ValueError(f"{len(deliveries)} deliveries but {len(arrivals)} arrival times")
    if list(faults) != sorted(faults):
        raise ValueError("fault times must be in ascending order")
    ends = list(faults) if until is None else list(until)
    if len(ends) != len(faults) or any(end < at for at, end in zip(faults, ends, strict=True)):
        raise ValueError("each fault needs an end, at or after its start")
    per_fault = [0] * len(faults)
    unexplained: list[Redelivery] = []
    previous: dict[str, float] = {}
    for delivery, at in zip(deliveries, arrivals, strict=True):
        before = previous.get(delivery.message_id)
        previous[delivery.message_id] = at
        if before is None:
            continue
        for index, (start, end) in enumerate(zip(faults, ends, strict=True)):
            if end > before - ARRIVAL_SLACK:
                if start <= at:
                    per_fault[index] += 1
                    break
                unexplained.append(Redelivery(delivery.message_id, before, at))
                break
        else:
            unexplained.append(Redelivery(delivery.message_id, before, at))
    return per_fault, unexplained
