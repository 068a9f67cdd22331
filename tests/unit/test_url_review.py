"""Review (first-use): passwords printed by the URL check when the URL has no `scheme://`.

`mask_url` returns its input unchanged when `_SCHEME` does not match, and `_split` quotes
`mask_url(url)` in its "is not a URL" error, so any typo in the scheme (a missing scheme, one
slash, a libpq key/value DSN) prints the whole secret. Run by subprocess, exactly as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("outbox-relay"))
PG = "postgresql://root@127.0.0.1/outbox_test"
AMQP = "amqp://guest:guest@127.0.0.1/"

CASES = [
    ("database", "host=db user=app password=S3CRETdsn dbname=app"),  # libpq key/value DSN
    ("database", "postgresql:/app:S3CRETslash@db/app"),  # one slash
    ("database", "app:S3CRETnoscheme@db/app"),  # scheme forgotten
    ("amqp", "guest:S3CRETamqp@rabbit:5672/"),  # scheme forgotten
    ("amqp", "amqp:/guest:S3CRETamqpslash@rabbit/"),  # one slash
    ("amqp", f"{AMQP},guest:S3CRETsecond@rabbit2/"),  # second URL of a list lacks its scheme
]


@pytest.mark.parametrize(("which", "url"), CASES)
def test_url_check_never_prints_the_password(which: str, url: str) -> None:
    db, amqp = (url, AMQP) if which == "database" else (PG, url)
    proc = subprocess.run(
        [CLI, "health", "--database-url", db, "--amqp-url", amqp],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    secret = next(w for w in url.replace("@", " ").replace(":", " ").split() if "S3CRET" in w)
    secret = secret.split("=")[-1].split("/")[0]
    assert proc.returncode == 2, out
    assert secret not in out, out
