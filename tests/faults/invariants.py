"""What must hold after every fault scenario, checked against the outbox table and the tap.

* 0 lost, 0 unexpected (rolled back never delivered), per-key order of first deliveries, and
  duplicates only within the bound the scenario states (`check_history`).
* Every row ends published (or dead, where the scenario makes dead letters).
* Attempts are not spent by connection failures: only rows the broker refused have attempts or
  failure history.
* Nothing is marked published without a broker ack: every published row was delivered.
* Recovery: the relay delivered again within `RECOVERY_LIMIT` seconds of each heal.
* Where the writers kept a log of what they committed (`load.Writers.log`): nothing they
  logged is lost, and each key arrives in their commit order, independently of `seq`.
* Where the scenario names its faults: each fault caused at most its own bound of
  redeliveries (`Fault.allowed`), not merely the sum over the scenario.

`check_scenario` runs every check and returns what failed (tests of broken relays assert on
it); `verify` records the scenario's figures and fails on any finding.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from outbox import Outbox
from tests.support.history import (
    Delivery,
    HistoryReport,
    check_history,
    check_write_order,
    redeliveries_per_fault,
)
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


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault of a scenario: when it happened (monotonic) and how many redeliveries it may
    cause (the messages whose confirm or record it can cut off)."""

    at: float
    allowed: int
    what: str = ""
    until: float | None = None  # when a fault that lasts ended (a pause); None: an instant


@dataclasses.dataclass(frozen=True)
class Findings:
    """What the checks found: the history report, and one message per failed check."""

    history: HistoryReport
    problems: dict[str, str]

    @property
    def failed(self) -> set[str]:
        """Names of the checks that failed (see `CHECKS`)."""
        return set(self.problems)


#: Every check `check_scenario` makes, by name.
CHECKS = (
    "lost",
    "unexpected",
    "rolled back in outbox",
    "reordered",
    "inconsistent",
    "duplicates",
    "duplicates per fault",
    "nothing committed",
    "write log lost",
    "write log order",
    "final status",
    "attempts spent",
    "published never delivered",
    "recovery",
)


def final_status_problem(states: Mapping[str, RowState], dead: Collection[str]) -> str | None:
    """Every row ends published, or dead where the scenario makes dead letters."""
    wrong = {
        i: s.status for i, s in states.items() if s.status != ("dead" if i in dead else "published")
    }
    return f"rows not in their final state: {_head(wrong)}" if wrong else None


def spent_attempts_problem(states: Mapping[str, RowState], refused: Collection[str]) -> str | None:
    """Connection faults never spend attempts: only rows the broker refused have attempts or
    failure history."""
    spent = {
        i: (s.attempts, s.failures)
        for i, s in states.items()
        if i not in refused and (s.attempts or s.failures)
    }
    return f"attempts spent on rows the broker never refused: {_head(spent)}" if spent else None


def unacked_problem(states: Mapping[str, RowState], delivered: Collection[str]) -> str | None:
    """Nothing is marked published without a broker ack: every published row was delivered."""
    unacked = [i for i, s in states.items() if s.status == "published" and i not in delivered]
    return f"rows marked published but never delivered: {unacked[:10]}" if unacked else None


def recovery_problem(recoveries: Sequence[float | None]) -> str | None:
    """The relay delivered again within `RECOVERY_LIMIT` seconds of each heal."""
    slow = [r for r in recoveries if r is None or r >= RECOVERY_LIMIT]
    if not slow:
        return None
    return f"no delivery within {RECOVERY_LIMIT} s of a heal (recoveries: {list(recoveries)})"


def fault_duplicates_problem(
    deliveries: Sequence[Delivery], arrivals: Sequence[float], faults: Sequence[Fault]
) -> str | None:
    """Each fault caused at most its own bound of redeliveries (`redeliveries_per_fault`)."""
    ordered = sorted(faults, key=lambda f: f.at)
    per_fault, unexplained = redeliveries_per_fault(
        deliveries,
        arrivals,
        [f.at for f in ordered],
        until=[f.at if f.until is None else f.until for f in ordered],
    )
    over = [
        f"{f.what or 'fault'} #{n}: {count} > {f.allowed}"
        for n, (f, count) in enumerate(zip(ordered, per_fault, strict=True), start=1)
        if count > f.allowed
    ]
    if unexplained:
        # Times relative to the first fault, with every fault's span: enough to tell a late
        # stamp from a relay that sent a message twice on its own.
        origin = ordered[0].at if ordered else 0.0
        spans = ", ".join(
            f"{f.at - origin:.2f}" + ("" if f.until is None else f"..{f.until - origin:.2f}")
            for f in ordered
        )
        seen = "; ".join(
            f"{r.message_id} at {r.before - origin:.2f} and {r.at - origin:.2f}"
            for r in unexplained[:5]
        )
        over.append(f"{len(unexplained)} redeliveries after no fault ({seen}; faults at {spans})")
    return "duplicates over the bound of their fault: " + "; ".join(over) if over else None


def check_scenario(
    engine: sa.Engine,
    box: Outbox,
    deliveries: Sequence[Delivery],
    *,
    max_duplicates: int | None,
    recoveries: Sequence[float | None] = (),
    rolled_back: Collection[str] = (),
    refused: Collection[str] = (),
    dead: Collection[str] = (),
    write_log: Mapping[str, Sequence[str]] | None = None,
    faults: Sequence[Fault] | None = None,
    arrivals: Sequence[float] | None = None,
) -> Findings:
    """Run every check (`CHECKS`) against the outbox table and the deliveries; raise nothing.

    `refused`: ids the broker legitimately refused (they may have attempts and failures).
    `dead`: ids that must end dead; every other row must end published.
    `write_log`: the writers' own record of commit order per key (`Writers.log`).
    `faults` with `arrivals` (the observer's stamps, one per delivery): the per-fault bound.
    """
    rows = written(engine, box)
    rolled = set(rolled_back)
    # The writers' word decides what was rolled back: a rolled-back event found in the table
    # is a writer bug, and its delivery is unexpected, whatever the table says.
    resurrected = [w.id for w in rows if w.id in rolled]
    history = check_history(
        [w for w in rows if w.id not in rolled], deliveries, rolled_back=rolled_back
    )
    problems: dict[str, str] = {}
    if resurrected:
        problems["rolled back in outbox"] = (
            f"rows of rolled-back transactions in the outbox ({len(resurrected)}): "
            f"{resurrected[:10]}"
        )
    for name, found in (
        ("lost", history.lost),
        ("unexpected", history.unexpected),
        ("reordered", history.reordered),
        ("inconsistent", history.inconsistent),
    ):
        if found:
            problems[name] = f"{name} ({len(found)}): {found[:10]}"
    if max_duplicates is not None and history.duplicates > max_duplicates:
        problems["duplicates"] = f"duplicates: {history.duplicates} > allowed {max_duplicates}"
    if history.committed == 0:
        problems["nothing committed"] = "the scenario committed nothing: it tested nothing"
    if write_log is not None:
        log_lost, log_reordered = check_write_order(write_log, deliveries)
        if log_lost:
            problems["write log lost"] = (
                f"committed by the writers, never delivered ({len(log_lost)}): {log_lost[:10]}"
            )
        if log_reordered:
            problems["write log order"] = (
                f"delivered out of the writers' commit order ({len(log_reordered)}): "
                + ", ".join(f"key {k}: {a} after {b}" for k, a, b in log_reordered[:10])
            )
    if faults is not None:
        if arrivals is None:
            raise ValueError("faults need the arrival time of every delivery")
        problem = fault_duplicates_problem(deliveries, arrivals, faults)
        if problem:
            problems["duplicates per fault"] = problem
    states = row_states(engine, box)
    delivered = {d.message_id for d in deliveries}
    for name, problem in (
        ("final status", final_status_problem(states, dead)),
        ("attempts spent", spent_attempts_problem(states, refused)),
        ("published never delivered", unacked_problem(states, delivered)),
        ("recovery", recovery_problem(recoveries)),
    ):
        if problem:
            problems[name] = problem
    return Findings(history=history, problems=problems)


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
    write_log: Mapping[str, Sequence[str]] | None = None,
    faults: Sequence[Fault] | None = None,
    arrivals: Sequence[float] | None = None,
    notes: str = "",
) -> ScenarioResult:
    """Check every invariant (`check_scenario`); the result is recorded before any assertion
    can fail, and the assertion names every check that failed."""
    findings = check_scenario(
        engine,
        box,
        deliveries,
        max_duplicates=max_duplicates,
        recoveries=recoveries,
        rolled_back=rolled_back,
        refused=refused,
        dead=dead,
        write_log=write_log,
        faults=faults,
        arrivals=arrivals,
    )
    result = scenario_result(findings, scenario, started, max_duplicates, recoveries, notes)
    record(result)
    assert not findings.problems, f"{scenario}: " + "\n  ".join(
        f"[{name}] {message}" for name, message in findings.problems.items()
    )
    return result


def scenario_result(
    findings: Findings,
    scenario: str,
    started: float,
    max_duplicates: int | None,
    recoveries: Sequence[float | None],
    notes: str = "",
) -> ScenarioResult:
    history = findings.history
    measured = [r for r in recoveries if r is not None]
    return ScenarioResult(
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


def _head(items: Mapping[str, Any]) -> str:
    shown = dict(list(items.items())[:10])
    return f"{len(items)} rows, e.g. {shown}"
