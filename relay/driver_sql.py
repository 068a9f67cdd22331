"""The relay's hottest statements, run on the psycopg connection beneath SQLAlchemy's.

The statements themselves are written once, with SQLAlchemy, in `relay.store` (the SQL stays
in one place and is quoted by the dialect). What this module saves is SQLAlchemy's execution
layer around each call: building the execution context, processing parameters and wrapping
rows cost 150 to 300 µs of Python per statement, about as much as the round trip itself, and
the relay runs about nine statements per event at a low rate. A `DriverStatement` is
compiled once; each call only merges its parameters and hands the SQL text to psycopg, which
prepares it on the server after a few uses.

Semantics are unchanged: the same SQL text SQLAlchemy would send (the parameters carry the
dialect's casts), on the same connection, with the same transaction boundaries. `relay.store`
wraps the driver's errors as SQLAlchemy's error handling would (disconnects included), so
that they are translated alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler


class DriverStatement:
    """A SQLAlchemy statement compiled once for psycopg's `%(name)s` parameters."""

    def __init__(self, statement: sa.ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.positional:
            raise ValueError("DriverStatement needs a dialect with named parameters")
        self.sql = str(compiled)
        # Values the statement carries itself (literals such as a status), then the names a
        # call must give: a missing one would otherwise be sent as NULL.
        self._defaults = dict(compiled.params)
        self._required = frozenset(
            name for name, bind in compiled.binds.items() if bind.required and bind.value is None
        )
        processors = {
            name: bind.type.bind_processor(dialect) for name, bind in compiled.binds.items()
        }
        self._processors: dict[str, Callable[[Any], Any]] = {
            name: processor for name, processor in processors.items() if processor is not None
        }
        self.columns: tuple[str, ...] = tuple(
            name for name, *_ in getattr(compiled, "_result_columns", ())
        )

    def parameters(self, given: Mapping[str, Any]) -> dict[str, Any]:
        missing = self._required - given.keys()
        if missing:
            raise TypeError(f"statement parameters missing: {sorted(missing)}")
        values = {**self._defaults, **given}
        for name, processor in self._processors.items():
            values[name] = processor(values[name])
        return values

    def run(self, cursor: psycopg.Cursor[Any], given: Mapping[str, Any]) -> psycopg.Cursor[Any]:
        """Execute on `cursor` (prepared on the server once used often enough). Errors are the
        driver's own: the caller, which knows the connection, wraps them (`relay.store`)."""
        return cursor.execute(self.sql, self.parameters(given))
