"""Values bound into scripts by `relay.sql_literals`: the same text psycopg's own client-side
binding writes (its `mogrify` is the oracle, on a real connection), values the server reads
back unchanged under either setting of `standard_conforming_strings`, and psycopg's own
quoting wherever the fast path does not apply.

Each assumption of the module's argument has a test: the text equals psycopg's per type
(generated values, and the edge cases of each rule), the fast path is really taken for the
types it claims (else the equality would hold trivially), a real claim carrying confirms on
names and keys that need quoting binds exactly what psycopg would, and the fallbacks
(other types, another client encoding, a NUL) are psycopg's.
"""

from __future__ import annotations

import datetime as dt
import enum
import random
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay import sql_literals
from relay.sql_literals import LiteralTemplate, literal
from relay.store import Carried, Store
from tests.support.relays import write_events

# Characters each rule must handle: quotes, backslashes, array syntax, ASCII and Unicode white
# space (only some of which psycopg quotes in arrays), letters of other scripts, an emoji.
ALPHABET = "ab'\"\\{},% \t\n\r\f\v\u00a0\u1680\u2003\u2028\u202f\u3000\u0085éß表😀Nn"


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    dsn = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def mogrify(conn: psycopg.Connection[Any], value: Any) -> str:
    return psycopg.ClientCursor(conn).mogrify("%s", [value])


def generated_values(seed: int, count: int) -> list[Any]:
    rng = random.Random(seed)

    def text() -> str:
        special = rng.choice(["", "null", "NULL", "Null", "x" * 255])
        return rng.choice([special, "".join(rng.choices(ALPHABET, k=rng.randint(0, 12)))])

    def integer() -> int:
        bits = rng.choice([7, 15, 16, 31, 32, 62, 63])
        return rng.randint(-(2**bits), 2**bits - 1)

    def moment() -> dt.datetime:
        offset = dt.timedelta(minutes=rng.choice([0, 60, -330, 345, -720]))
        return dt.datetime(
            rng.randint(1, 9999),
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            rng.choice([0, rng.randint(0, 999_999)]),
            tzinfo=dt.timezone(offset),
        )

    makers = [
        text,
        integer,
        moment,
        lambda: uuid.uuid4(),
        lambda: rng.random() < 0.5,
        lambda: [text() for _ in range(rng.randint(0, 4))],
        lambda: [integer() for _ in range(rng.randint(1, 4))],
        lambda: [uuid.uuid4() for _ in range(rng.randint(1, 3))],
    ]
    return [rng.choice(makers)() for _ in range(count)]


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


EDGE_CASES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**15 - 1,
    -(2**15),
    2**15,
    -(2**15) - 1,
    2**31 - 1,
    2**31,
    2**63 - 1,
    -(2**63),
    "",
    "'",
    "\\",
    "a'b\\c",
    "NULL",
    "k" * 255,
    "é" * 127,
    uuid.UUID(int=0),
    dt.datetime(2026, 12, 3, 6, 16, 49, tzinfo=dt.UTC),  # no microseconds: str() omits them
    dt.datetime(1, 1, 1, tzinfo=dt.UTC),
    [],
    [0],
    [2**15 - 1],
    [2**15],
    [-(2**15)],
    [-(2**15) - 1],
    [2**31 - 1, 1],
    [2**31],
    [-(2**31) - 1],
    [2**63 - 1],
    [-(2**63)],
    [""],
    ["null", "NULL", "nullx"],
    ['a"b', "c\\d", "{}", "a,b", "a b", "\u2003", "\u00a0", "\u0085"],
    ["k" * 255, "'"],
]


def test_the_text_is_psycopgs_for_every_value_the_fast_path_takes(
    conn: psycopg.Connection[Any],
) -> None:
    values = EDGE_CASES + generated_values(seed=20261203, count=3000)
    taken = 0
    for value in values:
        ours = literal(value)
        if ours is None:
            continue
        taken += 1
        assert ours == mogrify(conn, value), value
    # Every value above is of a type the fast path claims: none may fall through to psycopg.
    assert taken == len(values)


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        dt.datetime(2026, 12, 3, 6, 16),  # naive: timestamp, not timestamptz
        dt.date(2026, 12, 3),
        b"bytes",
        [[1, 2], [3, 4]],
        [1, None],
        [None],
        [True],
        [1.5],
        2**63,
        -(2**63) - 1,
        [2**63],
        Level.HIGH,
        type("Name", (str,), {})("subclass"),
    ],
    ids=repr,
)
def test_other_values_go_to_psycopgs_own_quoting(conn: psycopg.Connection[Any], value: Any) -> None:
    assert literal(value) is None
    assert LiteralTemplate("SELECT %(v)s").bind({"v": value}, conn) == (
        psycopg.ClientCursor(conn).mogrify("SELECT %(v)s", {"v": value})
    )


@pytest.mark.parametrize("value", ["a\x00b", ["a", "b\x00"], [1, "a"]], ids=repr)
def test_what_psycopg_refuses_is_refused(conn: psycopg.Connection[Any], value: Any) -> None:
    assert literal(value) is None
    with pytest.raises(psycopg.DataError):
        LiteralTemplate("SELECT %(v)s").bind({"v": value}, conn)


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_the_server_reads_every_value_back_unchanged(
    conn: psycopg.Connection[Any], conforming: str
) -> None:
    conn.execute(f"SET standard_conforming_strings = {conforming}")
    conn.execute("SET escape_string_warning = off")
    texts = [v for v in EDGE_CASES + generated_values(seed=7, count=400) if isinstance(v, str)]
    lists = [v for v in EDGE_CASES + generated_values(seed=8, count=400) if isinstance(v, list)]
    for value in texts:
        assert conn.execute(f"SELECT {literal(value)}::text").fetchone() == (value,)
    for items in lists:
        kind = "text" if not items or isinstance(items[0], str) else ""
        cast = f"::{kind}[]" if kind else ""
        (read,) = conn.execute(f"SELECT ({literal(items)}){cast}").fetchone() or (None,)
        assert read == items, items


def test_placeholders_are_split_once_and_percent_signs_kept(
    conn: psycopg.Connection[Any],
) -> None:
    template = LiteralTemplate("SELECT %(a)s || '%%' || %(b)s, %(a)s")
    assert template.bind({"a": "x", "b": 2}, conn) == "SELECT 'x' || '%' || 2, 'x'"
    assert LiteralTemplate("SELECT 1").bind({}, conn) == "SELECT 1"
    with pytest.raises(ValueError, match="placeholder"):
        LiteralTemplate("SELECT '100%'")
    with pytest.raises(KeyError):
        template.bind({"a": "x"}, conn)


def test_another_client_encoding_binds_through_psycopg(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn.execute("SET client_encoding = 'LATIN1'")
    assert conn.info.encoding != "utf-8"
    used = []
    monkeypatch.setattr(sql_literals, "literal", lambda value: used.append(value))
    values = {"a": "café'\\", "b": ["x y", "é"], "c": uuid.UUID(int=5)}
    text = "SELECT %(a)s, %(b)s, %(c)s"
    assert LiteralTemplate(text).bind(values, conn) == (
        psycopg.ClientCursor(conn).mogrify(text, values)
    )
    assert used == []


def test_a_claim_carrying_confirms_binds_what_psycopg_would(
    pg_engine: sa.Engine, quoted_outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's own statements and values, on names that need quoting and keys that stress
    the quoting (quotes, backslashes, array syntax, 255 bytes, white space)."""
    keys = ["k'1", "k\\2", 'k"{3}', "k 4,", "é" * 127 + "k", "NULL"]
    write_events(pg_engine, quoted_outbox, [Event(type="t", key=key) for key in keys * 2])
    store = Store(pg_engine, quoted_outbox, db_timeout=10)
    compared: list[str] = []
    bind = LiteralTemplate.bind

    def checked(
        self: LiteralTemplate, values: dict[str, Any], conn: psycopg.Connection[Any]
    ) -> str:
        text = bind(self, values, conn)
        assert text == psycopg.ClientCursor(conn).mogrify(self.text, values)
        compared.append(text)
        return text

    monkeypatch.setattr(LiteralTemplate, "bind", checked)
    moment = dt.datetime.now(dt.UTC)
    lease = moment + dt.timedelta(seconds=30)
    first = store.claim(owner="r'\\", limit=100, run_length=1, lease_until=lease, now=moment)
    assert sorted(str(e.key) for e in first.events) == sorted(keys)
    carried = Carried(
        {first.token: [e.seq for e in first.events]},
        {first.token: [e.key for e in first.events if e.key is not None]},
        False,
        "r'\\",
    )
    written, second = store.write_and_claim(
        carried, owner="r'\\", limit=100, run_length=1, lease_until=lease, now=moment
    )
    assert written.owned == len(keys)
    assert sorted(str(e.key) for e in second.events) == sorted(keys)
    assert len(compared) >= 6
