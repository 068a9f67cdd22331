"""A real PgBouncer in transaction mode in front of the local PostgreSQL, for the tests that
check the relay behind one (`tests/integration/test_pgbouncer.py`).

`.ci/services` installs PgBouncer from Debian's package. PgBouncer refuses to run as root: as
root, it runs as the `postgres` user, from a directory of that user's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CONFIG = """\
[databases]
* = host=127.0.0.1 port=5432 user=root

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
; Fewer server sessions than clients: transactions of one client land on several sessions.
default_pool_size = 4
max_client_conn = 200
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
{extra}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@contextlib.contextmanager
def pgbouncer(database: str, *, ignore_options: bool = False) -> Iterator[str]:
    """Start PgBouncer (transaction mode, pool of 4 server sessions); yield a SQLAlchemy URL
    of `database` through it; stop it. `ignore_options`: it drops libpq's `options` without
    a word (`ignore_startup_parameters = options`, common for clients that send them)
    instead of refusing them."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise FileNotFoundError("pgbouncer is not installed (.ci/services installs it)")
    directory = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
    port = _free_port()
    config = directory / "pgbouncer.ini"
    extra = "ignore_startup_parameters = options" if ignore_options else ""
    config.write_text(CONFIG.format(port=port, directory=directory, extra=extra))
    command = [binary, str(config)]
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        shutil.chown(config, "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                err = process.stderr.read().decode() if process.stderr else ""
                log = directory / "pgbouncer.log"
                raise RuntimeError(
                    f"pgbouncer did not start: {err} {log.read_text() if log.exists() else ''}"
                )
            time.sleep(0.05)
        yield f"postgresql+psycopg://root@127.0.0.1:{port}/{database}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
