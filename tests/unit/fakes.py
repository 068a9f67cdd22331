"""A publisher that answers from a script instead of a broker: unit tests drive it step by step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from relay.messages import BrokerStatus, Outcome, OutgoingMessage, PublishOutcome, Sink


class FakePublisher:
    """Records what was published; `settle()` answers outstanding messages with `decide`."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.ready = False
        self.outstanding: list[OutgoingMessage] = []
        self.published: list[OutgoingMessage] = []
        self.decide: Callable[[OutgoingMessage], Outcome] = lambda m: Outcome.CONFIRMED
        self.auto_settle = False
        self.stopped = False
        # What had been published at each flush (`Publisher.flush`).
        self.flushes: list[int] = []

    def start(self) -> None:
        self.ready = True
        self.sink([BrokerStatus(up=True)])

    def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        self.published.extend(messages)
        self.outstanding.extend(messages)
        if self.auto_settle:
            self.settle()

    def flush(self) -> None:
        self.flushes.append(len(self.published))

    def settle(self) -> None:
        answers = [
            PublishOutcome(
                m.tag, self.decide(m), None if self.decide(m) is Outcome.CONFIRMED else "no"
            )
            for m in self.outstanding
        ]
        self.outstanding = []
        if answers:
            self.sink(answers)

    def go_down(self) -> None:
        self.ready = False
        lost = [PublishOutcome(m.tag, Outcome.UNKNOWN, "lost") for m in self.outstanding]
        self.outstanding = []
        self.sink([BrokerStatus(up=False, error="down"), *lost])

    def come_up(self) -> None:
        self.ready = True
        self.sink([BrokerStatus(up=True)])

    def stop(self, timeout: float) -> None:
        """Like the real publisher: whatever is unconfirmed comes back as UNKNOWN."""
        self.stopped = True
        self.ready = False
        lost = [
            PublishOutcome(m.tag, Outcome.UNKNOWN, "publisher stopped") for m in self.outstanding
        ]
        self.outstanding = []
        if lost:
            self.sink(lost)
