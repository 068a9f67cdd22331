"""Database jobs run one at a time, in order, and every completion reaches the loop."""

from __future__ import annotations

import queue
import threading

from relay.worker import Completion, InlineWorker, ThreadWorker


def test_thread_worker_runs_jobs_in_order_and_posts_results_and_errors() -> None:
    inbox: queue.SimpleQueue[Completion] = queue.SimpleQueue()
    worker = ThreadWorker(inbox.put)
    seen: list[tuple[object, str | None]] = []
    threads: set[str] = set()

    def job(n: int) -> int:
        threads.add(threading.current_thread().name)
        if n == 2:
            raise ValueError("two")
        return n

    for n in range(5):
        worker.submit(lambda n=n: job(n), lambda r, e: seen.append((r, str(e) if e else None)))
    for _ in range(5):
        inbox.get(timeout=5).deliver()  # completions run on the loop's thread
    worker.stop(timeout=5)
    assert seen == [(0, None), (1, None), (None, "two"), (3, None), (4, None)]
    assert threads == {"relay-db"}


def test_inline_worker_completes_at_once() -> None:
    seen: list[object] = []
    InlineWorker().submit(lambda: 7, lambda r, e: seen.append(r))
    assert seen == [7]
