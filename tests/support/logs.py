"""Log lines as the daemons write them with `--log-format json`, captured for assertions."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from relay.logs import EVENT_FIELDS, _JsonFormatter


class JsonLog:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def entries(self) -> list[dict[str, Any]]:
        """Every line written so far, each parsed (a line that is not one JSON object fails)."""
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def about(self, event_id: object) -> list[dict[str, Any]]:
        """The lines whose message names `event_id`: the lines about that event."""
        return [e for e in self.entries() if str(event_id) in e["message"]]


def assert_carries_event(
    entry: dict[str, Any], event_id: object, type_: str, key: str | None
) -> None:
    """`entry` names the event in the three top-level fields a log search uses."""
    missing = [name for name in EVENT_FIELDS if name not in entry]
    assert not missing, f"line lacks {missing}: {entry}"
    assert (entry["event_id"], entry["event_type"], entry["event_key"]) == (
        str(event_id),
        type_,
        key,
    ), entry


@contextlib.contextmanager
def json_log(level: int = logging.INFO) -> Iterator[JsonLog]:
    """Capture what reaches the root logger, formatted as `--log-format json` formats it."""
    log = JsonLog()
    handler = logging.StreamHandler(log.stream)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield log
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
