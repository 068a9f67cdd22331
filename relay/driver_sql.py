"""The relay's hottest statements, run on the psycopg connection beneath SQLAlchemy's.

The statements themselves are written once, with SQLAlchemy, in `relay.store` (the SQL stays
in one place and is quoted by the dialect). What this module saves is SQLAlchemy's execution
layer around each call: building the execution context, processing parameters and wrapping
rows cost 150 to 300 µs of Python per statement, about as much as the round trip itself, and
the relay runs about nine statements per event at a low rate. A `DriverStatement` is
compiled once; each call only merges its parameters and hands the SQL text to psycopg (which
prepares nothing on the relay's connections: see `relay.store.create_engine`).

Semantics are unchanged: the same SQL text SQLAlchemy would send (the parameters carry the
dialect's casts), on the same connection, with the same transaction boundaries. `relay.store`
wraps the driver's errors as SQLAlchemy's error handling would (disconnects included), so
that they are translated alike.

The claim goes further, and its own transaction boundaries are its own (`Store.claim`): its
statements are sent as one script in one implicit transaction, one round trip, on the
autocommit connection, and its read is prepared on the server by name (`PreparedOnServer`)
and runs a generic plan. A script's results are read as they arrive (`run_script`), so that
a caller can act on the first part of a script while the server runs the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
import sqlalchemy as sa
from psycopg import generators, pq
from psycopg.adapt import Transformer
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.sql.compiler import SQLCompiler


class _Bound:
    """A compiled statement's parameters: the values it carries itself (literals such as a
    status), the names a call must give (a missing one would otherwise be sent as NULL) and
    the dialect's conversions of the values."""

    def __init__(self, compiled: SQLCompiler, dialect: Dialect) -> None:
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

    def parameters(self, given: Mapping[str, Any]) -> dict[str, Any]:
        missing = self._required - given.keys()
        if missing:
            raise TypeError(f"statement parameters missing: {sorted(missing)}")
        values = {**self._defaults, **given}
        for name, processor in self._processors.items():
            values[name] = processor(values[name])
        return values


class DriverStatement(_Bound):
    """A SQLAlchemy statement compiled once for psycopg's `%(name)s` parameters."""

    def __init__(self, statement: sa.ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.positional:
            raise ValueError("DriverStatement needs a dialect with named parameters")
        super().__init__(compiled, dialect)
        self.sql = str(compiled)
        self.columns: tuple[str, ...] = tuple(
            name for name, *_ in getattr(compiled, "_result_columns", ())
        )

    def run(self, cursor: psycopg.Cursor[Any], given: Mapping[str, Any]) -> psycopg.Cursor[Any]:
        """Execute on `cursor`. Errors are the driver's own: the caller, which knows the
        connection, wraps them (`relay.store`)."""
        return cursor.execute(self.sql, self.parameters(given))


class PreparedOnServer(_Bound):
    """A statement prepared by name on the server (SQL `PREPARE`), to be run from a script of
    several statements sent as one query (`Store.claim`): psycopg prepares only single
    statements, and a script is what makes a transaction one round trip.

    `prepare_sql` is sent alone, without parameters; `execute_sql` is written for a
    client-side bound cursor (`psycopg.ClientCursor`, `%(name)s` parameters, passed by
    name). Which sessions have it prepared is remembered per connection object
    (`needs_prepare`, `prepared_on`, `forget`). A session can lose it: psycopg sends
    `DEALLOCATE ALL` after a ROLLBACK, DROP, ALTER, DISCARD ALL or DEALLOCATE ALL on a
    session where it prepared statements itself, and a pooler in transaction mode hands
    out another server session. Running it then fails with `InvalidSqlStatementName`
    (and the script's transaction with it); preparing it where it is already, with
    `DuplicatePreparedStatement`. The caller corrects this record and goes on."""

    def __init__(self, statement: sa.ClauseElement, dialect: Dialect, *, prefix: str) -> None:
        assert isinstance(dialect, DefaultDialect)
        numbered = type(dialect)(paramstyle="numeric_dollar")
        compiled = statement.compile(dialect=numbered)
        assert isinstance(compiled, SQLCompiler) and compiled.positiontup is not None
        super().__init__(compiled, dialect)
        sql = str(compiled)
        if "%" in sql:  # a client-side bound script would read it as a placeholder
            raise ValueError("PreparedOnServer: a statement without '%' is needed")
        # Named by its text: stores of different outboxes (or versions) on one session never
        # run each other's statement.
        self.name = f"{prefix}_{hashlib.sha1(sql.encode()).hexdigest()[:16]}"
        self.prepare_sql = f"PREPARE {self.name} AS {sql}"
        arguments = ", ".join(f"%({name})s" for name in compiled.positiontup)
        self.execute_sql = f"EXECUTE {self.name}({arguments})"
        self._sessions: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

    def needs_prepare(self, conn: psycopg.Connection[Any]) -> bool:
        return conn not in self._sessions

    def prepared_on(self, conn: psycopg.Connection[Any]) -> None:
        self._sessions.add(conn)

    def forget(self, conn: psycopg.Connection[Any]) -> None:
        self._sessions.discard(conn)


class StepResult(NamedTuple):
    """What one statement of a script gave: its rows (none unless it returns rows) and how
    many rows it returned or changed."""

    rows: list[Any]
    rowcount: int


# Told each step's name as its result comes in, with the results so far (`run_script`).
Progress = Callable[[str, Mapping[str, StepResult]], None]


def run_script(
    conn: psycopg.Connection[Any],
    steps: Sequence[tuple[str, str]],
    *,
    progress: Progress | None = None,
) -> dict[str, StepResult]:
    """Send `steps` (named statements, their values bound into them) as one query, one round
    trip, and return what each step gave, by name. The server stops at the first statement
    that fails; its error is raised once every result is read (the connection is only ready
    for the next query then).

    Results are read one by one, as libpq completes them, and `progress` is told of each
    step as soon as its result is in, while the server may still be running the steps after
    it. The server sends what it has at the latest when the query ends; a statement that
    sends a notice makes it send everything before it at once (`Store.claim_then_write`
    relies on that). An exception of `progress` is raised once the rest is read, but the
    server does not stop for it: the steps after it run, and may commit. Were a transaction
    left aborted behind it, it is rolled back first (only a driver error is rolled back by
    the caller). The first failure is the one raised: a lost connection after a step failed
    does not hide the server's error. `progress` runs while the connection is busy: it must
    not use it."""
    sql = ";\n".join(text for _, text in steps)
    names = iter([name for name, _ in steps])
    results: dict[str, StepResult] = {}
    failure: BaseException | None = None
    with conn.lock:
        pgconn = conn.pgconn
        pgconn.send_query(sql.encode(conn.info.encoding))
        conn.wait(generators.send(pgconn))
        transformer = Transformer.from_context(conn)
        while True:
            try:
                # Waiting costs a generator and a poll: only where libpq has no complete
                # result at hand yet (most come several to a packet).
                if pgconn.is_busy():
                    result = conn.wait(generators.fetch(pgconn))
                else:
                    result = pgconn.get_result()
            except psycopg.Error as exc:
                failure = failure or exc
                break
            if result is None:
                break
            if failure is not None:
                continue  # read to the end
            try:
                name = _step_answered(result, names, conn)
                rows: list[Any] = []
                if result.status == pq.ExecStatus.TUPLES_OK:
                    transformer.set_pgresult(result)
                    rows = transformer.load_rows(0, result.ntuples, tuple)
                count = result.command_tuples
                results[name] = StepResult(rows, -1 if count is None else count)
                if progress is not None:
                    progress(name, results)
            except BaseException as exc:
                failure = exc
    if failure is not None:
        if not isinstance(failure, psycopg.Error) and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
        raise failure
    missing = next(names, None)
    if missing is not None:
        # Never seen; reading on would give this step the rows of another.
        raise RuntimeError(f"the database answered no result for the step {missing!r}")
    return results


def _step_answered(
    result: pq.abc.PGresult, names: Iterator[str], conn: psycopg.Connection[Any]
) -> str:
    if result.status == pq.ExecStatus.FATAL_ERROR:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    name = next(names, None)
    if name is None:
        raise RuntimeError("the database answered more results than the script has steps")
    return name
