"""Every Python block of README.md runs as written, each in a fresh database, and does what
the text around it says."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.docs.readme import (
    README_URL,
    RUN_AS_FILES,
    Block,
    fresh_database,
    python_blocks,
    run_block,
)
from tests.support.alembic_project import readme_blocks

BLOCKS = [b for b in python_blocks() if b.section not in RUN_AS_FILES]


def _outbox_rows(url: str) -> list[tuple[str, str | None, str | None]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT type, key, aggregate_id FROM outbox ORDER BY seq"))
            return [tuple(r) for r in rows]  # type: ignore[misc]
    finally:
        engine.dispose()


def test_the_readme_has_the_blocks_this_file_checks() -> None:
    names = {b.name for b in BLOCKS}
    assert {"Embedding the writer #0", "Embedding the writer #1"} <= names, names
    for block in BLOCKS:
        if "create_engine" in block.code:
            assert README_URL in block.code, f"{block.name} connects elsewhere than {README_URL}"


def test_every_block_run_as_a_file_is_one_the_alembic_project_uses() -> None:
    as_files = [b.name for b in python_blocks() if b.section in RUN_AS_FILES]
    assert sorted(as_files) == sorted(b.name for b in readme_blocks().values())


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_every_python_block_runs_as_written(block: Block) -> None:
    with fresh_database() as url:
        result = run_block(block, url)
        assert result.returncode == 0, f"README line {block.line}:\n{result.stderr}"
        if block.name == "Embedding the writer #0":
            # Both routes wrote their event, keyed by the order, in the order of the code.
            assert _outbox_rows(url) == [
                ("order.placed", "order:1", "1"),
                ("order.placed", "order:2", "2"),
            ]
            engine = sa.create_engine(url)
            try:
                with engine.connect() as conn:
                    statuses = conn.execute(sa.text("SELECT status FROM orders ORDER BY id"))
                    assert list(statuses.scalars()) == ["placed", "placed"]
            finally:
                engine.dispose()
        if block.name == "Embedding the writer #1":
            assert _outbox_rows(url) == [("order.paid", "order:1", None)]
