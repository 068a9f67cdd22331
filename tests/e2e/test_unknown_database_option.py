"""A database URL with a query parameter libpq does not know is a usage error (exit 2) in every
command, with no traceback (found by review: `run` ended in a psycopg traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("outbox-relay"))
URL = "postgresql://root@127.0.0.1/outbox_test?bogusparam=1"  # e.g. a typo: sslmod=require
AMQP = "amqp://guest:guest@127.0.0.1/"


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--until-empty", "--database-url", URL, "--amqp-url", AMQP],
        ["health", "--database-url", URL, "--amqp-url", AMQP],
        ["status", "--database-url", URL],
    ],
    ids=["run", "health", "status"],
)
def test_unknown_connection_option_is_a_usage_error(args: list[str]) -> None:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == 2, out
