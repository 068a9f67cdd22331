"""Values bound into the text of a script, as psycopg's client-side binding would write them,
for the few types the relay's scripts carry.

A script of several statements goes to the server as one simple query (`Store._script`), so
its values are bound on the client. psycopg's `ClientCursor.mogrify` does that for any type:
it parses the statement, looks up a dumper for each value, dumps it and escapes it through
libpq. For a claim carrying one confirm that took 120 to 330 µs of CPU, a third of the claim's
client time, on the path of every event at low rates (it runs before the claim is sent).

A `LiteralTemplate` splits a statement's text at its placeholders once. Binding then writes
each value itself, for the values the relay sends: None, bool, int, str, UUID, an aware
datetime, and flat lists of int, str or UUID without NULLs. Any other value (a subclass of
those, a naive datetime, a float, a nested list...) goes to psycopg's own quoting on the
script's connection, value by value, so nothing is refused that psycopg would take.

Why the text is the same as psycopg's, character for character (a test compares them over
generated values): each branch below is psycopg 3's rule for that type (`psycopg.types`):
numbers as digits (a negative one after a space, so that `-` never follows `-`); str through
PQescapeLiteral's rule (every `'` doubled, and with a backslash in it every `\\` doubled and
the literal written ` E'...'`, which reads the same whatever `standard_conforming_strings`
is); a UUID as its hex digits cast to uuid; a datetime as `str()` of it cast to timestamptz;
a list in PostgreSQL's array syntax, its elements quoted where array input needs it (psycopg's
`_get_needs_quotes_regexp`), a list of int cast to the smallest integer type that holds all of
its elements. The escaping is done on characters, before the query is encoded: the server
decodes the query before it reads the literals, so this holds in any client encoding, and the
fast path is only taken where the connection's encoding is UTF-8 (psycopg's default) anyway.
A str with a NUL character goes to psycopg, which refuses it (PostgreSQL text cannot hold
one).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")
# Array elements that array input would read otherwise: psycopg's rule, on characters
# (its own runs on the UTF-8 bytes: `\s` there is ASCII white space only).
_NEEDS_QUOTES = re.compile(
    '^$|["{},\\\\ \t\n\r\f\v]|^null$|[\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]',
    re.IGNORECASE,
)
_ELEMENT_ESCAPE = re.compile(r'(["\\])')
_INT2, _INT4, _INT8 = 2**15, 2**31, 2**63


class LiteralTemplate:
    """A statement's text, split once at its `%(name)s` placeholders (`%%` is a `%`)."""

    def __init__(self, text: str) -> None:
        self.text = text
        pieces: list[str] = []
        names: list[str] = []
        current: list[str] = []
        position = 0
        for match in _PLACEHOLDER.finditer(text):
            current.append(text[position : match.start()])
            if match.group(1) is not None:
                pieces.append("".join(current))
                names.append(match.group(1))
                current = []
            elif match.group(0) == "%%":
                current.append("%")
            else:
                raise ValueError(f"a '%' that is not a %(name)s placeholder nor '%%' in: {text}")
            position = match.end()
        current.append(text[position:])
        pieces.append("".join(current))
        self._first = pieces[0]
        self._rest = tuple(zip(names, pieces[1:], strict=True))

    def bind(self, values: Mapping[str, Any], conn: psycopg.Connection[Any]) -> str:
        """The text with `values` in it, as `psycopg.ClientCursor(conn).mogrify` writes it."""
        ours = conn.info.encoding == "utf-8"
        parts = [self._first]
        for name, after in self._rest:
            value = values[name]
            text = literal(value) if ours else None
            if text is None:
                text = sql.Literal(value).as_string(conn)
            parts += (text, after)
        return "".join(parts)


def literal(value: Any) -> str | None:
    """`value` as a SQL literal, or None where psycopg's own quoting is needed."""
    kind = type(value)
    if value is None:
        return "NULL"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        if not -_INT8 <= value < _INT8:
            return None
        return str(value) if value >= 0 else f" {value}"
    if kind is str:
        return _string(value)
    if kind is uuid.UUID:
        return f"'{value.hex}'::uuid"
    if kind is dt.datetime and value.utcoffset() is not None:
        return f"'{value}'::timestamptz"
    if kind is list:
        return _array(value)
    return None


def _string(value: str) -> str | None:
    if "\x00" in value:
        return None
    escaped = value.replace("'", "''")
    if "\\" in value:
        return " E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


def _array(items: list[Any]) -> str | None:
    if not items:
        return "'{}'"
    kinds = set(map(type, items))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is int:
        biggest = max(max(items), -min(items) - 1)
        if biggest >= _INT8:
            return None
        cast = "int2[]" if biggest < _INT2 else "int4[]" if biggest < _INT4 else "int8[]"
        return "'{" + ",".join(map(str, items)) + "}'::" + cast
    if kind is uuid.UUID:
        return "'{" + ",".join(item.hex for item in items) + "}'::uuid[]"
    if kind is str:
        if any("\x00" in item for item in items):
            return None
        elements = ",".join(
            '"' + _ELEMENT_ESCAPE.sub(r"\\\1", item) + '"' if _NEEDS_QUOTES.search(item) else item
            for item in items
        )
        return _string("{" + elements + "}")
    return None
