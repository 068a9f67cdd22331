"""pytest fixtures for applications: `pytest_plugins = ["outbox.consumer.pytest_plugin"]`.

`record_outbox_events(engine, outbox=..., events=...)` returns an `EventRecorder` that stops
listening when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox.consumer.testing import EventRecorder


@pytest.fixture
def record_outbox_events() -> Iterator[Callable[..., EventRecorder]]:
    recorders: list[EventRecorder] = []

    def start(engine: Any, **options: Any) -> EventRecorder:
        recorder = EventRecorder(engine, **options).start()
        recorders.append(recorder)
        return recorder

    yield start
    for recorder in recorders:
        recorder.stop()
