"""`relay.session_options` without a server: what the relay sends libpq as options, and how a
refusal is handled (the rest, against real PostgreSQL and PgBouncer, is in
`tests/integration/test_pgbouncer.py`)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from relay.session_options import SessionCheck, joined, refused, url_options, where


@pytest.fixture(autouse=True)
def no_pgoptions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGOPTIONS", raising=False)


def options_of(url: str) -> str | None:
    return url_options(sa.make_url(url))[1]


def test_several_options_are_joined_and_taken_out_of_the_url() -> None:
    url, given = url_options(sa.make_url("postgresql://h/db?options=-ca%3D1&options=-cb%3D2&x=y"))
    assert given == "-ca=1 -cb=2"
    assert "options" not in url.query and url.query["x"] == "y"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("options=-cwork_mem%3D64MB%5C", "-cwork_mem=64MB"),  # a lone backslash at the end
        ("options=-cwork_mem%3D64MB%5C%5C", "-cwork_mem=64MB\\\\"),  # an escaped one stays
        ("options=-ca%3D1%5C&options=-cb%3D2", "-ca=1 -cb=2"),  # in the first of two
        ("options=-ca%3D1%5C%20&options=-cb%3D2", "-ca=1 -cb=2"),  # before trailing space
        ("options=%20", None),
    ],
)
def test_a_dangling_escape_never_reaches_the_options_after_it(
    query: str, expected: str | None
) -> None:
    assert options_of(f"postgresql://h/db?{query}") == expected


def test_pgoptions_count_as_the_users_own_unless_the_url_gives_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGOPTIONS", "-csearch_path=env")
    assert options_of("postgresql://h/db") == "-csearch_path=env"
    assert options_of("postgresql://h/db?options=-csearch_path%3Durl") == "-csearch_path=url"


def test_later_options_come_last() -> None:
    assert joined(None, "-ca=1", "", "-cb=2") == "-ca=1 -cb=2"


def test_where_names_hosts_never_credentials_or_query() -> None:
    assert where(sa.make_url("postgresql://u:secret@db.example:6432/app?sslpassword=s")) == (
        "db.example:6432/app"
    )
    several = sa.make_url("postgresql://u@/app?host=a:6432&host=b:6432")
    assert where(several) == "a:6432,b:6432/app"


@pytest.mark.parametrize(
    "text",
    [
        "FATAL:  unsupported startup parameter: options",
        "FATAL:  unsupported startup parameter in options: statement_timeout",
        "FATAL:  unsupported options startup parameter: only '-c config=val' is allowed",
    ],
)
def test_each_pgbouncer_refusal_is_recognised(text: str) -> None:
    assert refused(psycopg.OperationalError(f"connection failed: {text}"))
    assert not refused(psycopg.OperationalError("connection refused"))


class RefusingDialect:
    """Refuses any connection that carries options, once per call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def connect(self, *cargs: Any, **cparams: Any) -> str:
        self.calls.append(dict(cparams))
        if "options" in cparams:
            raise psycopg.OperationalError("FATAL:  unsupported startup parameter: options")
        return "connection"


def test_a_refusal_retries_without_options_and_leaves_the_engines_parameters_alone() -> None:
    """Some SQLAlchemy releases hand every connection of an engine the same `cparams`:
    taking `options` out of it would have raced other connections and dropped the relay's
    settings for the rest of the process (found by review)."""
    check = SessionCheck(sa.make_url("postgresql://h/db"), None, timeout=1)
    dialect = RefusingDialect()
    shared = {"options": "-c a=1", "host": "h"}
    assert check.connect(dialect, None, (), shared) == "connection"
    assert shared == {"options": "-c a=1", "host": "h"}
    assert dialect.calls == [{"options": "-c a=1", "host": "h"}, {"host": "h"}]
    assert check.connect(dialect, None, (), shared) == "connection"
    assert dialect.calls[2] == {"options": "-c a=1", "host": "h"}, "tried with options again"


def test_a_refusal_of_another_parameter_is_not_blamed_on_options() -> None:
    """Refused again without options (libpq sent a parameter of its environment, PGGEQO
    say): the error is the server's own, not one about the user's options (found by review:
    it blamed options '?')."""

    class RefusesEverything(RefusingDialect):
        def connect(self, *cargs: Any, **cparams: Any) -> str:
            raise psycopg.OperationalError("FATAL:  unsupported startup parameter: geqo")

    check = SessionCheck(sa.make_url("postgresql://h/db"), None, timeout=1)
    with pytest.raises(psycopg.OperationalError, match="geqo"):
        check.connect(RefusesEverything(), None, (), {"options": "-c a=1"})


def test_a_services_options_count_as_the_users_own_in_libpqs_order(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options of a libpq service file: the relay's options would replace them (found by
    review: a service's search_path lost, another outbox). libpq's order: the URL's, then
    the service's, then PGOPTIONS."""
    services = tmp_path / "pg_service.conf"
    services.write_text(
        "[withopts]\nhost=127.0.0.1\nport=9\noptions=-csearch_path=app\n[without]\nport=9\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGOPTIONS", "-csearch_path=env")
    assert options_of("postgresql://?service=withopts") == "-csearch_path=app"
    assert options_of("postgresql://?service=withopts&options=-cx%3D1") == "-cx=1"
    assert options_of("postgresql://?service=without") == "-csearch_path=env"
    monkeypatch.setenv("PGSERVICE", "withopts")
    assert options_of("postgresql://h/db") == "-csearch_path=app"


def test_a_service_is_read_from_its_files_only_as_libpq_reads_them(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's file first, then PGSYSCONFDIR's; comments skipped; a service found in the
    user's file ends the search. Read from the files, never by connecting (found by review:
    a libpq connection started to read them looked the service's host up in DNS, unbounded,
    and opened a TCP connection to it)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pg_service.conf").write_text(
        "# system\n[sys]\nhost=never-resolved.invalid\noptions = -csearch_path=sys\n"
        "[both]\noptions=-csearch_path=system\n"
    )
    (tmp_path / "user.conf").write_text("[both]\n# no options here\nport=9\n")
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "user.conf"))
    monkeypatch.setenv("PGSYSCONFDIR", str(tmp_path / "etc"))
    assert options_of("postgresql://?service=sys") == "-csearch_path=sys"
    assert options_of("postgresql://?service=both") is None
    assert options_of("postgresql://?service=missing") is None
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "no-such-file"))
    assert options_of("postgresql://?service=both") == "-csearch_path=system"
