"""Thousands of dead letters make a few log lines, and none goes unmentioned."""

from __future__ import annotations

import logging

import pytest

from relay.dead_letter_log import DeadLetterLog
from relay.records import Failure

from .test_sequencer import ev


def test_a_burst_is_logged_in_full_and_the_rest_summarised_once_the_window_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    dead = DeadLetterLog(logging.getLogger("t"), lambda: clock[0], burst=3, window=60)
    with caplog.at_level(logging.ERROR, logger="t"):
        for seq in range(2500):
            dead.dead(Failure(event=ev(seq, "k"), error="unroutable", next_attempt_at=None))
        assert len(caplog.records) == 3
        assert "is dead after 1 attempts: unroutable" in caplog.records[0].getMessage()
        clock[0] = 59.0
        dead.flush()
        assert len(caplog.records) == 3  # the window is not over yet
        clock[0] = 60.0
        dead.flush()
        assert len(caplog.records) == 4
        assert caplog.records[3].getMessage().startswith("2497 more events went dead")
        dead.dead(Failure(event=ev(9999, "k"), error="x", next_attempt_at=None))
        assert len(caplog.records) == 5  # a new window logs in full again
