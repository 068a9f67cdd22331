"""What the relay reports as it works. The base class ignores everything; `PrometheusMetrics`
(relay.prometheus) exports it. Hooks are called from the relay loop thread only."""

from __future__ import annotations


class Metrics:
    def claimed(self, count: int) -> None:
        """A claim leased `count` events."""

    def published(
        self, event_type: str, commit_to_confirm: float, publish_to_confirm: float
    ) -> None:
        """One event confirmed by the broker; latencies in seconds."""

    def failed(self, event_type: str, *, dead: bool) -> None:
        """One publish rejected (nack, return, channel error); `dead` if no attempts remain."""

    def lease_lost(self, count: int) -> None:
        """Results for `count` events were fenced off: another relay owns them now."""

    def broker_up(self, up: bool) -> None:
        """The broker connection came up or went down."""

    def broker_node(self, node: str) -> None:
        """The broker connection is up on this cluster node (`host:port`)."""

    def database_up(self, up: bool) -> None:
        """The database answered again, or stopped answering."""
