"""Connection URLs: the one check every command applies, and masking for logs and errors.

Masking never trusts a URL parser. A password may hold any character (`#`, `?`, `/`, `@`, `:`,
`%`), and `urllib` or SQLAlchemy then split the URL in the wrong place and hand part of the
password back as the host or the path. Instead: the credentials of `scheme://user:password@host`
end at the *last* `@` of the URL, whatever comes before it, and a comma-separated list is
split into its URLs first (a cluster's `amqp://a@h1,amqp://b@h2`). That can hide more than the
password (an `@` in a query string), never less.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from relay.errors import ConfigError

_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.\-]*)://(?P<rest>.*)$", re.I | re.S)
_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.\-]*://\S*", re.I)
_NEXT_URL = re.compile(r",\s*(?=[a-z][a-z0-9+.\-]*://)", re.I)
_PASSWORD_PARAM = re.compile(r"(?P<name>[?&;]password=)[^&;#\s]*", re.I)

DATABASE_URL_FORMS = (
    "postgresql://user:password@host:5432/db, postgresql+psycopg://user:password@host/db or "
    "sqlite:///path/to/app.db"
)
AMQP_URL_FORMS = "amqp://user:password@host:5672/vhost or amqps://... (vhost / is %2F)"
_DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "sqlite", "sqlite+pysqlite")
_AMQP_SCHEMES = ("amqp", "amqps")


def mask_url(url: str) -> str:
    """`amqp://guest:secret@host/` -> `amqp://guest:***@host/`; lists are masked URL by URL."""
    starts = [0] + [m.end() for m in _NEXT_URL.finditer(url)]
    ends = [m.start() for m in _NEXT_URL.finditer(url)] + [len(url)]
    pieces, last = [], 0
    for start, end in zip(starts, ends, strict=True):
        pieces.append(url[last:start])
        pieces.append(_mask_one(url[start:end]))
        last = end
    pieces.append(url[last:])
    return "".join(pieces)


_KEYWORD_PASSWORD = re.compile(r"(?P<name>(?:^|\s)password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\S+)", re.I)


def _mask_one(url: str) -> str:
    match = _SCHEME.match(url)
    if match is None:
        # Not a URL (a mistyped scheme, none at all, a libpq key=value string): never echo
        # what could be a password. Everything between the first ":" and the last "@" goes.
        masked = _KEYWORD_PASSWORD.sub(r"\g<name>***", url)
        head, colon, tail = masked.partition(":")
        if colon and "@" in tail:
            masked = f"{head}:***@{tail.rpartition('@')[2]}"
        return masked
    scheme, rest = match.group("scheme"), match.group("rest")
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{after}"
    # libpq also takes the password as a query parameter.
    return f"{scheme}://" + _PASSWORD_PARAM.sub(r"\g<name>***", rest)


def mask_text(text: str) -> str:
    """Mask every URL password inside free text (driver error messages quote URLs)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def check_database_url(url: str) -> str:
    """The URL, or `ConfigError` saying which forms work. The same check for every command."""
    if not url or not url.strip():
        raise ConfigError(f"database URL is empty: use {DATABASE_URL_FORMS}")
    scheme, userinfo, _ = _split(url, "database", DATABASE_URL_FORMS)
    if scheme.lower() not in _DATABASE_SCHEMES:
        raise ConfigError(
            f"database URL {mask_url(url)} is not supported (scheme {scheme}://): use "
            f"{DATABASE_URL_FORMS}; the relay talks to PostgreSQL through psycopg 3"
        )
    # SQLAlchemy ends the password at its first "@": the rest would become the host name.
    _refuse_raw(url, userinfo, "@ \t", "database")
    if scheme.lower().startswith("sqlite") and not url.split("://", 1)[1].startswith("/"):
        raise ConfigError(
            f"database URL {mask_url(url)}: a SQLite URL has three slashes and a path, "
            "e.g. sqlite:///app.db (relative) or sqlite:////var/lib/app.db (absolute)"
        )
    import sqlalchemy as sa

    try:
        sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise ConfigError(
            f"database URL {mask_url(url)} cannot be parsed: use {DATABASE_URL_FORMS}"
        ) from None
    if scheme.lower().startswith("postgres"):
        _check_libpq_options(url)
    return url


def _check_libpq_options(url: str) -> None:
    """libpq refuses an option it does not know (a typo such as `?sslmod=require`) only when
    it connects: say so here, once, as a usage error."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from relay.listener import psycopg_dsn

    try:
        conninfo_to_dict(psycopg_dsn(url))
    except psycopg.ProgrammingError as exc:
        detail = mask_text(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise ConfigError(
            f"database URL {mask_url(url)}: {detail} (a query parameter libpq does not know?)"
        ) from None


def split_url_list(value: str) -> list[str]:
    """The URLs of a comma-separated list, stripped; a comma inside a URL (in a password, say)
    does not split it, only one before the next `scheme://`."""
    return [part.strip() for part in _NEXT_URL.split(value.strip()) if part.strip()]


def amqp_urls(url: str) -> list[str]:
    """The URLs of a comma-separated list, each one checked (see `check_amqp_url`)."""
    if not url or not url.strip():
        raise ConfigError(f"broker URL is empty: use {AMQP_URL_FORMS}")
    urls = split_url_list(url)
    for one in urls:
        scheme, userinfo, _ = _split(one, "broker", AMQP_URL_FORMS)
        if scheme.lower() not in _AMQP_SCHEMES:
            raise ConfigError(
                f"broker URL {mask_url(one)} is not supported (scheme {scheme}://): use "
                f"{AMQP_URL_FORMS}"
            )
        # urllib (and so pika) ends the host part at the first "/", "?" or "#".
        _refuse_raw(one, userinfo, "/?# \t", "broker")
        try:
            urlsplit(one).port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ConfigError(
                f"broker URL {mask_url(one)} has a port that is not a number: use {AMQP_URL_FORMS}"
            ) from None
        if not urlsplit(one).hostname:
            raise ConfigError(f"broker URL {mask_url(one)} names no host: use {AMQP_URL_FORMS}")
    return urls


def check_amqp_url(url: str) -> str:
    """The URL (or list of URLs), or `ConfigError` saying which forms work."""
    amqp_urls(url)
    return url


def _split(url: str, what: str, forms: str) -> tuple[str, str, str]:
    """(scheme, user:password, host and the rest), splitting at the last "@"."""
    match = _SCHEME.match(url.strip())
    if match is None:
        raise ConfigError(f"{what} URL {mask_url(url)!r} is not a URL: use {forms}")
    userinfo, at, after = match.group("rest").rpartition("@")
    return match.group("scheme"), userinfo if at else "", after


_ENCODED = {"@": "%40", "/": "%2F", "?": "%3F", "#": "%23", " ": "%20", "\t": "%09"}


def _refuse_raw(url: str, userinfo: str, characters: str, what: str) -> None:
    found = sorted({c for c in userinfo if c in characters})
    if found:
        codes = ", ".join(f"{c!r} as {_ENCODED[c]}" for c in found)
        raise ConfigError(
            f"{what} URL {mask_url(url)}: the user name or password holds "
            f"{' '.join(repr(c) for c in found)}, "
            f"which ends that part of a URL early: percent-encode it ({codes}; % itself as %25)"
        )
