"""A three-node RabbitMQ cluster, started once per test run (about 15 s) and stopped after the
last test of this package, for the tests of the production topology (issue 16): a relay given
every node's URL, publishing to a quorum queue replicated on all three, while nodes are
stopped and killed.

The nodes are this machine's RabbitMQ with their own names, ports and data directories in a
temporary directory (tests/cluster/nodes.py); the machine's own `rabbit@localhost` is never
touched. Each scenario's figures are printed in the terminal summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import Outbox
from relay.settings import RelaySettings
from tests.cluster.nodes import Cluster, Node
from tests.faults.invariants import ScenarioResult
from tests.faults.observe import Observer
from tests.faults.rig import FAULT_SETTINGS
from tests.faults.runners import RelayThread
from tests.support.rabbit import QueueTap, unique_name

_RESULTS = pytest.StashKey[list[ScenarioResult]]()


# Package scope: started once per run (the cluster tests all live in this package) and
# stopped as soon as the last of them is done, not left idling through the rest of the suite.
@pytest.fixture(scope="package")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class QuorumTap(QueueTap):
    """The fault suite's tap, on a quorum queue replicated on every node of the cluster."""

    def __init__(self, amqp_url: str, replicas: int) -> None:
        super().__init__(amqp_url, prefix="cluster-tap")
        self.replicas = replicas

    def __enter__(self) -> QuorumTap:
        try:
            self._ensure_channel().queue_declare(
                self.queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-quorum-initial-group-size": self.replicas,
                },
            )
        except BaseException:
            self.close()
            raise
        return self


class ClusterRig:
    """One scenario: the cluster, a quorum tap on `tap_node` (a node no scenario stops), an
    exchange bound to it, and relay settings listing every node."""

    def __init__(
        self,
        cluster: Cluster,
        engine: sa.Engine,
        box: Outbox,
        pg_url: str,
        tap: QuorumTap,
        exchange: str,
        record: Callable[[ScenarioResult], None],
    ) -> None:
        self.cluster = cluster
        self.engine = engine
        self.box = box
        self.pg_url = pg_url
        self.tap = tap
        self.exchange = exchange
        self.observer = Observer(tap)
        self.record = record
        self.started = time.monotonic()

    @property
    def tap_node(self) -> Node:
        return self.cluster.nodes[-1]

    def settings(self, **overrides: Any) -> RelaySettings:
        values: dict[str, Any] = {
            "database_url": self.pg_url,
            "amqp_url": self.cluster.urls(),
            "schema": self.box.schema,
            "exchange": self.exchange,
            "name": unique_name("relay"),
            **FAULT_SETTINGS,
        }
        values.update(overrides)
        return RelaySettings(**values)

    def relay(self, settings: RelaySettings) -> RelayThread:
        return RelayThread(settings)

    def node_of(self, relay: RelayThread) -> Node:
        """The node the relay's publisher is connected to."""
        node = getattr(relay.relay.publisher, "node", None)
        assert isinstance(node, str)
        return self.cluster.node_for(node)

    def wait_connected_elsewhere(self, relay: RelayThread, away_from: Node, timeout: float) -> Node:
        """Wait until the relay's publisher is ready on another node; that node."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.node_of(relay)
            if node is not away_from and relay.relay.publisher.ready:
                return node
            if time.monotonic() > deadline:
                raise AssertionError(f"the relay did not move off {away_from.name}")
            self.observer.step()


@pytest.fixture
def cluster_rig(
    rabbit_cluster: Cluster,
    pg_engine: sa.Engine,
    pg_url: str,
    outbox_schema: Outbox,
    request: pytest.FixtureRequest,
) -> Iterator[ClusterRig]:
    rabbit_cluster.ensure_all_running()
    results = request.config.stash.setdefault(_RESULTS, [])

    def record(result: ScenarioResult) -> None:
        results.append(result)
        print(result.line())

    tap_node = rabbit_cluster.nodes[-1]
    with QuorumTap(tap_node.url, replicas=len(rabbit_cluster.nodes)) as tap:
        exchange = tap.declare_exchange(unique_name("cluster-ex"))
        tap.bind(exchange)
        yield ClusterRig(rabbit_cluster, pg_engine, outbox_schema, pg_url, tap, exchange, record)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    terminalreporter.write_sep("=", "cluster scenarios")
    for result in results:
        terminalreporter.write_line(result.line())
