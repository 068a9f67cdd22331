"""The relay's mailboxes: whatever is posted, from any thread or a signal handler, wakes the
next `take`; the loop mailbox runs its event loop only inside `take` and closes cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from relay.mailbox import LoopMailbox, QueueMailbox


@pytest.fixture
def mailbox() -> Iterator[LoopMailbox[str]]:
    box: LoopMailbox[str] = LoopMailbox(asyncio.new_event_loop())
    yield box
    box.close()


def test_a_put_from_another_thread_while_the_loop_is_not_running_wakes_the_next_take(
    mailbox: LoopMailbox[str],
) -> None:
    mailbox.take(0)
    thread = threading.Thread(target=mailbox.put, args=("job done",))
    thread.start()
    thread.join()
    started = time.monotonic()
    assert mailbox.take(5.0) == ["job done"]
    assert time.monotonic() - started < 1.0


def test_a_put_from_another_thread_ends_a_blocked_take(mailbox: LoopMailbox[str]) -> None:
    timer = threading.Timer(0.1, mailbox.put, args=("confirm",))
    timer.start()
    started = time.monotonic()
    assert mailbox.take(5.0) == ["confirm"]
    assert time.monotonic() - started < 2.0
    timer.join()


def test_a_signal_handler_ends_a_take_blocked_in_select(mailbox: LoopMailbox[str]) -> None:
    previous = signal.signal(signal.SIGUSR1, lambda *_: mailbox.interrupt("stop"))
    try:
        timer = threading.Timer(0.1, os.kill, args=(os.getpid(), signal.SIGUSR1))
        timer.start()
        started = time.monotonic()
        assert mailbox.take(5.0) == ["stop"]
        assert time.monotonic() - started < 2.0
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_stale_stop_costs_one_empty_take_at_most(mailbox: LoopMailbox[str]) -> None:
    mailbox.interrupt("a")  # a stop is queued for a loop that is not running
    assert mailbox.take(0) == ["a"]
    first = mailbox.take(0.05)
    second_started = time.monotonic()
    assert mailbox.take(0.2) == []
    assert first == [] and time.monotonic() - second_started >= 0.15


def test_close_with_a_pending_task_after_a_late_post_closes_the_loop() -> None:
    """A publisher that did not finish within its stop timeout (broker black-holed) leaves its
    connection task on the loop; a worker's completion or a second SIGTERM posted after the
    relay's last `take` has queued a `loop.stop()`. Closing must still cancel the task, let
    it clean up, and close the loop, not raise "Event loop stopped before Future completed"
    out of the relay's graceful stop."""
    box: LoopMailbox[str] = LoopMailbox(asyncio.new_event_loop())
    cleaned: list[str] = []

    async def connection() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append("settled")
            box.put("outcome while closing")  # from the loop itself: stops the round

    box.loop.create_task(connection())
    box.take(0)
    box.interrupt("late")
    box.close()
    assert cleaned == ["settled"]
    assert box.loop.is_closed()


def test_queue_mailbox_takes_everything_waiting() -> None:
    box: QueueMailbox[int] = QueueMailbox()
    assert box.take(0) == []
    box.put(1)
    box.interrupt(2)
    assert box.take(1.0) == [1, 2]
