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


def test_a_guard_with_a_cancel_cancels_first_and_shuts_down_only_after_the_grace(
    watchdog: Watchdog,
) -> None:
    """The cancel is asked for at the deadline (the server ends the statement and rolls it
    back); the socket is shut down only if the call still blocks `grace` later."""
    ours, theirs = socket.socketpair()
    cancelled: list[float] = []
    try:
        started = time.monotonic()
        with watchdog.guard(
            ours.fileno(), 0.2, cancel=lambda: cancelled.append(time.monotonic()), grace=0.4
        ):
            ours.settimeout(5)
            assert ours.recv(1) == b""  # nothing answered the cancel: shut down
        shut = time.monotonic() - started
    finally:
        ours.close()
        theirs.close()
    assert len(cancelled) == 1 and 0.19 <= cancelled[0] - started < 0.5
    assert 0.59 <= shut < 0.9


def test_a_call_its_cancel_ends_is_not_shut_down(watchdog: Watchdog) -> None:
    """The cancel answers (here: the peer writes, as the server sends the cancelled
    statement's error): the call ends within the grace and its socket stays usable."""
    ours, theirs = socket.socketpair()
    try:
        with watchdog.guard(ours.fileno(), 0.2, cancel=lambda: theirs.sendall(b"e"), grace=0.3):
            ours.settimeout(5)
            assert ours.recv(1) == b"e"
        time.sleep(0.5)  # past the grace
        theirs.sendall(b"y")
        assert ours.recv(1) == b"y"
    finally:
        ours.close()
        theirs.close()


def test_a_cancel_that_raises_still_leaves_the_shut_down_at_the_end_of_the_grace(
    watchdog: Watchdog,
) -> None:
    def broken() -> None:
        raise OSError("cannot reach the server for a cancel (test)")

    ours, theirs = socket.socketpair()
    try:
        started = time.monotonic()
        with watchdog.guard(ours.fileno(), 0.1, cancel=broken, grace=0.2):
            ours.settimeout(5)
            assert ours.recv(1) == b""
        assert 0.29 <= time.monotonic() - started < 0.6
    finally:
        ours.close()
        theirs.close()


def test_a_guard_says_whether_its_cancel_went_out(watchdog: Watchdog) -> None:
    ours, theirs = socket.socketpair()
    try:
        with watchdog.guard(ours.fileno(), 5.0, cancel=lambda: None, grace=1.0) as quick:
            pass
        with watchdog.guard(
            ours.fileno(), 0.1, cancel=lambda: theirs.sendall(b"e"), grace=1.0
        ) as late:
            ours.settimeout(5)
            assert ours.recv(1) == b"e"
    finally:
        ours.close()
        theirs.close()
    assert not quick.cancelled and late.cancelled
