"""A three-node RabbitMQ cluster of this machine's RabbitMQ, for the cluster tests.

Each node has its own name, AMQP and distribution ports, data directory, log directory and
plugins file, all under a temporary directory; the machine's own `rabbit@localhost` is never
touched (every rabbitmqctl call names its node with `-n`). Why the package's real scripts and
not the `rabbitmq-server` on the PATH: that wrapper switches to the rabbitmq user, drops the
environment and its `rabbitmq.conf` pins the listener to 5672 (../shared/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

START_TIMEOUT = 90.0
#: The broker's max_message_size on the test nodes: small, so that a test can hit it cheaply.
MAX_MESSAGE_SIZE = 65536


def _rabbit_bin() -> Path:
    wrapper = shutil.which("rabbitmq-server")
    if wrapper is None:
        raise RuntimeError("rabbitmq-server is not on the PATH")
    match = re.search(r"[^ \"'=]*rabbitmq/bin", Path(wrapper).read_text())
    if match is None:
        raise RuntimeError(f"cannot find RabbitMQ's scripts from {wrapper}")
    return Path(match.group(0))


def _rabbit_home() -> str:
    import pwd

    return pwd.getpwnam("rabbitmq").pw_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, base: Path, name: str) -> None:
        self.name = name  # e.g. rqc1-1a2b3c@localhost
        self.dir = base / name.split("@")[0]
        self.port = _free_port()
        self.dist_port = _free_port()
        self._bin = _rabbit_bin()
        self._home = _rabbit_home()
        self.dir.mkdir(parents=True)
        (self.dir / "plugins").write_text("[rabbitmq_consistent_hash_exchange].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            f"max_message_size = {MAX_MESSAGE_SIZE}\n"
            # Nodes started and stopped by tests come back at once (no long Mnesia waits).
            "mnesia_table_loading_retry_timeout = 5000\n"
            "mnesia_table_loading_retry_limit = 6\n"
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=self._home,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "plugins"),
            # Three VMs share two cores with the rest of the suite: one scheduler each, and no
            # busy-waiting schedulers burning CPU while idle.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none",
        )
        return env

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        result = subprocess.run(
            [str(self._bin / "rabbitmqctl"), "-n", self.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.dir,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed: "
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def start(self) -> None:
        """Start the node (detached) and wait until it is fully booted."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "pid").unlink()
        subprocess.run(
            [str(self._bin / "rabbitmq-server"), "-detached"],
            env=self._env(),
            cwd=self.dir,
            check=True,
            timeout=30,
            capture_output=True,
        )
        self.wait_up()

    def wait_up(self) -> None:
        # await_startup fails at once while the new VM has not registered with epmd yet.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=70)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node gracefully (its whole VM)."""
        self.ctl("stop", timeout=60)

    def pid(self) -> int:
        return int((self.dir / "pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, and wait until it is gone."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name} (pid {pid}) survived SIGKILL")

    def running(self) -> bool:
        try:
            os.kill(self.pid(), 0)
        except (ProcessLookupError, FileNotFoundError, ValueError):
            return False
        return True


class Cluster:
    """Three joined nodes; `nodes[0]` is the one the others joined."""

    def __init__(self, base: Path, size: int = 3) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.nodes = [Node(base, f"rqc{i + 1}-{suffix}@localhost") for i in range(size)]

    def start(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.start(), self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = first.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(len(self.nodes)):
            raise RuntimeError(f"cluster did not form: {running} nodes running")

    def stop(self) -> None:
        for node in self.nodes:
            if node.running():
                try:
                    node.stop()
                except Exception:
                    with contextlib.suppress(Exception):
                        node.kill()

    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node_for(self, label: str) -> Node:
        return next(node for node in self.nodes if node.label == label)

    def ensure_all_running(self) -> None:
        """Restart whatever a test left stopped (tests normally restart what they stop)."""
        for node in self.nodes:
            if not node.running():
                node.start()
        for node in self.nodes:
            node.wait_up()
