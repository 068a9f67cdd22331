"""Fixtures for fault tests: failures injected on the relay's real connections to the real
PostgreSQL and RabbitMQ, each followed by a check of the invariants (`invariants.py`).

An in-process relay's links both go through `FaultProxy` instances (`Rig.settings()`); relay
processes (`processes.py`) are killed and frozen with signals. A `QueueTap` on the real broker
records what arrives, with arrival times (`observe.py`), and writer threads commit events
meanwhile (`load.py`). Every scenario's figures (events, lost, duplicates, reordered, recovery
seconds) are printed in the terminal summary and written as JSON (its path is printed too).

    make test                   # includes these tests (about two minutes)
    OUTBOX_SOAK=1 .venv/bin/python -m pytest tests/faults -m soak   # the long soak (make soak)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import Outbox
from tests.faults.invariants import ScenarioResult
from tests.faults.observe import Observer
from tests.faults.proxy import FaultProxy
from tests.faults.rig import Rig
from tests.faults.runners import amqp_address, pg_address
from tests.support.rabbit import QueueTap, unique_name

_RESULTS = pytest.StashKey[list[ScenarioResult]]()
_REPORT_PATH = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def fault_report(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    path = tmp_path_factory.mktemp("faults") / "fault-report.json"
    request.config.stash[_REPORT_PATH] = path
    request.config.stash[_RESULTS] = []
    return path


@pytest.fixture
def record_result(
    fault_report: Path, request: pytest.FixtureRequest
) -> Callable[[ScenarioResult], None]:
    results = request.config.stash[_RESULTS]

    def record(result: ScenarioResult) -> None:
        results.append(result)
        print(result.line())  # shown with -s, and in the captured output of a failure
        # Rewritten after each scenario, so a crashed run still leaves its figures.
        fault_report.write_text(json.dumps([r.as_dict() for r in results], indent=2))

    return record


def _proxy(host: str, port: int) -> Iterator[FaultProxy]:
    proxy = FaultProxy(host, port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert proxy.errors == [], f"the fault proxy itself failed: {proxy.errors}"


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[FaultProxy]:
    yield from _proxy(*pg_address(pg_url))


@pytest.fixture
def amqp_proxy(amqp_url: str) -> Iterator[FaultProxy]:
    yield from _proxy(*amqp_address(amqp_url))


@pytest.fixture
def rig(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    pg_proxy: FaultProxy,
    amqp_proxy: FaultProxy,
    record_result: Callable[[ScenarioResult], None],
) -> Iterator[Rig]:
    with QueueTap(amqp_url, prefix="fault-tap") as tap:
        exchange = tap.declare_exchange(unique_name("fault-ex"))
        tap.bind(exchange)
        yield Rig(
            engine=pg_engine,
            box=outbox_schema,
            pg_url=pg_url,
            amqp_url=amqp_url,
            pg_proxy=pg_proxy,
            amqp_proxy=amqp_proxy,
            tap=tap,
            exchange=exchange,
            observer=Observer(tap),
            record=record_result,
        )


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    terminalreporter.write_sep("=", "fault scenarios")
    for result in results:
        terminalreporter.write_line(result.line())
    path = config.stash.get(_REPORT_PATH, None)
    if path is not None:
        terminalreporter.write_line(f"figures as JSON: {path}")
