"""What a user installing the package gets: imports that work with only the declared
dependencies, a version, and type information."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import outbox
import relay

BLOCK_GREENLET = "import sys; sys.modules['greenlet'] = None\n"


def test_outbox_and_the_cli_import_without_greenlet() -> None:
    # SQLAlchemy 2.1 no longer installs greenlet, and its asyncio module needs it: only the
    # `asyncio` extra brings it. Without it, the sync writer, the hook and the CLI must work.
    code = BLOCK_GREENLET + (
        "import outbox, relay.cli\n"
        "from outbox import Event, install, write\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "install(sessionmaker())\n"
        "from relay.cli import main\n"
        "main(['--help'], standalone_mode=False)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "outbox-relay" in result.stdout or "Usage" in result.stdout


def test_both_packages_carry_the_py_typed_marker() -> None:
    for package in (outbox, relay):
        assert (Path(package.__file__).parent / "py.typed").is_file(), package.__name__


def test_only_outbox_alembic_needs_alembic() -> None:
    # Alembic is the `alembic` extra: the writer and the CLI must not import it, and
    # outbox.alembic must say which extra brings it.
    code = (
        "import sys; sys.modules['alembic'] = None\n"
        "import outbox, outbox.ddl, relay.cli\n"
        "from relay.cli import main\n"
        "main(['init-db', '--help'], standalone_mode=False)\n"
        "try:\n"
        "    import outbox.alembic\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'outbox-relay[alembic]'" in result.stdout
