"""An Alembic project in a directory, set up as the README's "Migrations with Alembic" says.

`alembic init` makes it; the README's blocks are put into its `env.py` exactly as the README
tells users to; the `alembic` command runs it in a subprocess, as users run it (and because
`env.py` sets up logging with `fileConfig`, which would disable the test process's loggers).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

from tests.docs.readme import README, Block, python_blocks

REPO = Path(__file__).resolve().parents[2]
SECTION = "Migrations with Alembic"
UPGRADE_SECTION = "Upgrading the outbox's schema"
CONFIGURE_ARGUMENT = "include_object=outbox.alembic.include_object,"
ALEMBIC_TIMEOUT = 60.0


def readme_blocks() -> dict[str, Block]:
    """The section's Python blocks by use: env.py lines, first migration, upgrade migration."""
    env, first = (b for b in python_blocks() if b.section == SECTION)
    (upgrade,) = (b for b in python_blocks() if b.section == UPGRADE_SECTION)
    return {"env": env, "first": first, "upgrade": upgrade}


def revision_of(migration: str) -> str:
    match = re.search(r'^revision = "(.+)"$', migration, re.M)
    assert match, migration
    return match.group(1)


def models_module(table: str, schema: str | None) -> str:
    return (
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n\n"
        "from outbox import Outbox\n\n\n"
        "class Base(DeclarativeBase): ...\n\n\n"
        f"events = Outbox(Base.metadata, table={table!r}, schema={schema!r})\n\n\n"
        "class Order(Base):\n"
        '    __tablename__ = "orders"\n'
        "    id: Mapped[int] = mapped_column(primary_key=True)\n"
    )


@dataclasses.dataclass(frozen=True)
class AlembicProject:
    root: Path

    @property
    def versions(self) -> Path:
        return self.root / "migrations" / "versions"

    @classmethod
    def create(
        cls, root: Path, url: str, *, table: str = "outbox", schema: str | None = None
    ) -> AlembicProject:
        """`alembic init`, the README's env.py lines, and `myapp/models.py` with an outbox."""
        ini = root / "alembic.ini"
        command.init(Config(str(ini)), str(root / "migrations"), template="generic")
        text = ini.read_text()
        assert text.count("sqlalchemy.url = driver://user:pass@localhost/dbname\n") == 1
        ini.write_text(text.replace("driver://user:pass@localhost/dbname", url))
        env = root / "migrations" / "env.py"
        script = env.read_text()
        readme = README.read_text()
        assert f"`{CONFIGURE_ARGUMENT}`" in readme, "the README no longer says what to add"
        # "in place of `target_metadata = None`" and "to both `context.configure(...)` calls".
        assert script.count("\ntarget_metadata = None\n") == 1
        script = script.replace("\ntarget_metadata = None\n", "\n" + readme_blocks()["env"].code)
        assert script.count("context.configure(\n") == 2
        script = script.replace(
            "context.configure(\n", f"context.configure(\n{CONFIGURE_ARGUMENT}\n"
        )
        env.write_text(script)
        (root / "myapp").mkdir()
        (root / "myapp" / "__init__.py").write_text("")
        (root / "myapp" / "models.py").write_text(models_module(table, schema))
        return cls(root)

    def add_migration(self, migration: str) -> str:
        revision = revision_of(migration)
        (self.versions / f"{revision}.py").write_text(migration)
        return revision

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`alembic ARGS` in the project; `prepend_sys_path = .` puts `myapp` on the path."""
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        return subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=ALEMBIC_TIMEOUT,
            check=False,
        )

    def ok(self, *args: str) -> str:
        """`alembic ARGS`, which must succeed; its output (stdout and the log on stderr)."""
        result = self.run(*args)
        assert result.returncode == 0, f"alembic {' '.join(args)}:\n{result.stderr}"
        return result.stdout + result.stderr
