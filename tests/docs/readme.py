"""The README's Python blocks as programs: extract them, and run one against a fresh database.

Used by tests/docs/test_readme.py, and as a script by `make package-check`, which runs a README
example with the installed wheel (so this file imports nothing from the project):

    python tests/docs/readme.py run "Embedding the writer" [--index N]

Each block connects to `README_URL`; the runner replaces it with a database created for the
run (PostgreSQL on 127.0.0.1, role root) and drops that database afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "postgresql+psycopg://app@localhost/app"
"""The URL the README's blocks connect to; each run replaces it with a fresh database."""
PG_ADMIN_DSN = os.environ.get(
    "OUTBOX_TEST_PG_ADMIN_DSN", "host=127.0.0.1 user=root dbname=postgres"
)
PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/{database}"
BLOCK_TIMEOUT = 60.0
RUN_AS_FILES = {
    "Migrations with Alembic": "tests/integration/test_alembic.py",
    "Upgrading the outbox's schema": "tests/integration/test_alembic.py",
}
"""Sections whose blocks are files of a project (env.py lines, migrations), not programs: the
named test puts them into an Alembic project and runs that."""

_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_ANY_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@dataclasses.dataclass(frozen=True)
class Block:
    section: str  # the heading above it
    index: int  # its place among the Python blocks of that section, from 0
    line: int  # where it starts in README.md
    code: str

    @property
    def name(self) -> str:
        return f"{self.section} #{self.index}"


def python_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    blocks: list[Block] = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        # Headings outside code blocks (a Python comment "# 1. ..." is no heading).
        headings = re.findall(r"^#+ (.+)$", _ANY_FENCE.sub("", before), re.M)
        section = headings[-1].strip() if headings else "(top)"
        index = sum(1 for b in blocks if b.section == section)
        blocks.append(Block(section, index, before.count("\n") + 1, match.group(1)))
    return blocks


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A database of its own, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg

    name = f"readme_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(database=name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_block(
    block: Block, database_url: str, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    """Run the block as its own program, in an empty directory, against `database_url`."""
    code = block.code.replace(README_URL, database_url)
    with tempfile.TemporaryDirectory(prefix="readme-") as cwd:
        return subprocess.run(
            [python, "-c", code],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one README block in a fresh database")
    run.add_argument("section")
    run.add_argument("--index", type=int, default=0)
    args = parser.parse_args()
    matches = [b for b in python_blocks() if b.section == args.section and b.index == args.index]
    if not matches:
        print(f"no Python block #{args.index} under a heading {args.section!r}", file=sys.stderr)
        return 2
    (block,) = matches
    with fresh_database() as url:
        result = run_block(block, url)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"README block {block.name} (line {block.line}): exit {result.returncode}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(_main())
