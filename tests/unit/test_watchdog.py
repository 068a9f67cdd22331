"""The database deadline's watchdog (`relay.deadline`): each guard is enforced at its
deadline, whether it is due before the watchdog's next wake-up (it wakes the watchdog) or
after it (it does not need to)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.deadline import LONGEST_SLEEP, Watchdog


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    dog = Watchdog(name="test-watchdog")
    time.sleep(0.05)  # asleep, for up to LONGEST_SLEEP
    yield dog
    dog.stop()


def _seconds_until_shut(watchdog: Watchdog, seconds: float) -> float:
    """Guard one end of a socket pair for `seconds` and block on it as a database call would;
    how long until the watchdog shut it down."""
    ours, theirs = socket.socketpair()
    try:
        started = time.monotonic()
        with watchdog.guard(ours.fileno(), seconds):
            ours.settimeout(seconds + 5)
            assert ours.recv(1) == b""  # shut down: the blocked read ends
        return time.monotonic() - started
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("seconds", [0.2, LONGEST_SLEEP + 0.5])
def test_a_guard_is_enforced_at_its_deadline(watchdog: Watchdog, seconds: float) -> None:
    waited = _seconds_until_shut(watchdog, seconds)
    assert seconds - 0.01 <= waited < seconds + 0.3


def test_a_call_within_its_deadline_is_left_alone(watchdog: Watchdog) -> None:
    ours, theirs = socket.socketpair()
    try:
        with watchdog.guard(ours.fileno(), 0.3):
            theirs.sendall(b"x")
            assert ours.recv(1) == b"x"
        time.sleep(0.5)  # past the deadline: the guard is gone, the socket still works
        theirs.sendall(b"y")
        assert ours.recv(1) == b"y"
    finally:
        ours.close()
        theirs.close()


def test_a_guard_whose_number_now_names_a_file_does_not_end_the_watchdog(
    watchdog: Watchdog, tmp_path: Path
) -> None:
    """A connection closed inside its guard, its number reused by a file before the guard is
    due: nothing to shut down, and the watchdog goes on enforcing later deadlines (before,
    it died on it, and no deadline held after; found by review)."""
    with (tmp_path / "f").open("w") as file, watchdog.guard(file.fileno(), 0.05):
        time.sleep(0.2)  # the guard comes due on a file
    assert 0.15 <= _seconds_until_shut(watchdog, 0.15) < 0.5
