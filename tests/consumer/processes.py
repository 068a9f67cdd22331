"""`outbox-relay consume` as a subprocess of the test, on the test app's handlers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE = "tests.consumer.app:handlers"


class ConsumerProcess:
    def __init__(
        self,
        *,
        pg_url: str,
        amqp_url: str,
        exchange: str,
        schema: str,
        group: str,
        queues: int,
        log: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.log = log
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OUTBOX_TEST_SCHEMA": schema,
            "OUTBOX_TEST_GROUP": group,
            **(env or {}),
        }
        command = [
            sys.executable, "-m", "relay.cli", "consume", REFERENCE,
            "--database-url", pg_url, "--amqp-url", amqp_url, "--exchange", exchange,
            "--queues", str(queues), "--max-attempts", "2", "--retry-min", "10ms",
            "--retry-max", "10ms", "--name", log.stem, *args,
        ]  # fmt: skip
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"consumer did not exit; its log:\n{self.output()}") from None

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log_file.close()


@contextlib.contextmanager
def consumer_processes(**common: object) -> Iterator[Callable[..., ConsumerProcess]]:
    started: list[ConsumerProcess] = []

    def start(**more: object) -> ConsumerProcess:
        options = {**common, **more}
        process = ConsumerProcess(**options)  # type: ignore[arg-type]
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout: float = 30,
    logs: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not reached in {timeout} s" + (f"\n{logs()}" if logs else "")
            )
        time.sleep(0.05)
