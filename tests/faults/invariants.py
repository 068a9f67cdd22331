"""What must hold after every fault scenario, checked against the outbox table and the tap.

* 0 lost, 0 unexpected (rolled back never delivered), per-key order of first deliveries, and
  duplicates only within the bound the scenario states (`check_history`).
* Every row ends published (or dead, where the scenario makes dead letters).
* Attempts are not spent by connection failures: only rows the broker refused have attempts or
  failure history.
* Nothing is marked published without a broker ack: every published row was delivered.
* Recovery: the relay delivered again within `RECOVERY_LIMIT` seconds of each heal.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import sqlalchemy as sa

from outbox import Outbox
from tests.support.history import Delivery, check_history
from tests.support.relays import written

#: Seconds from a fault's end to the next delivery.
RECOVERY_LIMIT = 10.0


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    events: int
    delivered: int
    lost: int
    unexpected: int
    duplicates: int
    duplicates_allowed: int | None
    reordered: int
    recovery_s: float | None  # the worst recovery of the scenario's faults
    seconds: float
    notes: str = ""

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        return (
            f"{self.scenario:<32} events={self.events:<6} lost={self.lost:<3} "
            f"unexpected={self.unexpected:<3} dup={self.duplicates:<4} "
            f"reordered={self.reordered:<3} recovery_s={recovery:<6} time_s={self.seconds:.1f}"
            + (f"  {self.notes}" if self.notes else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RowState:
    status: str
    attempts: int
    failures: int


def row_states(engine: sa.Engine, box: Outbox) -> dict[str, RowState]:
    t, f = box.events, box.failures
    failures = sa.select(f.c.event_id, sa.func.count().label("n")).group_by(f.c.event_id).subquery()
    query = sa.select(
        t.c.id, t.c.status, t.c.attempts, sa.func.coalesce(failures.c.n, 0)
    ).select_from(t.outerjoin(failures, failures.c.event_id == t.c.id))
    with engine.connect() as conn:
        return {str(r[0]): RowState(r[1], r[2], r[3]) for r in conn.execute(query)}


def unfinished(engine: sa.Engine, box: Outbox) -> int:
    """Rows not yet published or dead."""
    t = box.events
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(t.c.status == "pending")
        return int(conn.execute(query).scalar_one())


def wait_until_finished(engine: sa.Engine, box: Outbox, timeout: float) -> bool:
    """Wait for every row to be published or dead (the relay records what the broker acked);
    False if some are still pending after `timeout` (`verify` then names them)."""
    deadline = time.monotonic() + timeout
    while unfinished(engine, box) > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)  # polling the table: there is nothing to wait on
    return True


def verify(
    engine: sa.Engine,
    box: Outbox,
    deliveries: Sequence[Delivery],
    *,
    scenario: str,
    started: float,
    record: Callable[[ScenarioResult], None],
    max_duplicates: int | None,
    recoveries: Sequence[float | None] = (),
    rolled_back: Collection[str] = (),
    refused: Collection[str] = (),
    dead: Collection[str] = (),
    notes: str = "",
) -> ScenarioResult:
    """Check every invariant; the result is recorded before any assertion can fail.

    `refused`: ids the broker legitimately refused (they may have attempts and failures).
    `dead`: ids that must end dead; every other row must end published.
    """
    history = check_history(written(engine, box), deliveries, rolled_back=rolled_back)
    measured = [r for r in recoveries if r is not None]
    result = ScenarioResult(
        scenario=scenario,
        events=history.committed,
        delivered=history.delivered,
        lost=len(history.lost),
        unexpected=len(history.unexpected),
        duplicates=history.duplicates,
        duplicates_allowed=max_duplicates,
        reordered=len(history.reordered),
        recovery_s=max(measured) if measured else None,
        seconds=time.monotonic() - started,
        notes=notes,
    )
    record(result)

    history.assert_ok(max_duplicates=max_duplicates)
    assert history.committed > 0, "the scenario committed nothing: it tested nothing"

    states = row_states(engine, box)
    wrong_status = {
        i: s.status for i, s in states.items() if s.status != ("dead" if i in dead else "published")
    }
    assert not wrong_status, f"rows not in their final state: {_head(wrong_status)}"

    spent = {
        i: (s.attempts, s.failures)
        for i, s in states.items()
        if i not in refused and (s.attempts or s.failures)
    }
    assert not spent, f"attempts spent on rows the broker never refused: {_head(spent)}"

    delivered = {d.message_id for d in deliveries}
    unacked = [i for i, s in states.items() if s.status == "published" and i not in delivered]
    assert not unacked, f"rows marked published but never delivered: {unacked[:10]}"

    slow = [r for r in recoveries if r is None or r >= RECOVERY_LIMIT]
    assert not slow, (
        f"no delivery within {RECOVERY_LIMIT} s of a heal (recoveries: {list(recoveries)})"
    )
    return result


def _head(items: dict[str, Any]) -> str:
    shown = dict(list(items.items())[:10])
    return f"{len(items)} rows, e.g. {shown}"
