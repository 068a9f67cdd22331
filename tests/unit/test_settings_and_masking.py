"""Settings are validated at the edge with messages that say what to fix; passwords never leak."""

from __future__ import annotations

import json
import logging

import pytest

from relay.errors import ConfigError
from relay.logs import configure_logging
from relay.settings import RelaySettings, parse_duration
from relay.urls import amqp_urls, check_amqp_url, check_database_url, mask_text, mask_url

# Every character with a meaning in URLs, and a few more.
SPECIAL_PASSWORDS = [
    "se#cret",
    "se?cret",
    "se/cret",
    "se@cret",
    "se:cret",
    "se%cret",
    "s#e?c/r@e:t%",
    "@@@",
    "se,cret",
    "[se]cret!$&'()*+;=",
]

BASE = {"database_url": "postgresql://app:pw@db/app", "amqp_url": "amqp://guest:secret@mq/"}


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:secret@mq:5672/%2F", "amqp://guest:***@mq:5672/%2F"),
        ("postgresql+psycopg://app:p%40ss@db/app", "postgresql+psycopg://app:***@db/app"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("sqlite:///tmp/app.db", "sqlite:///tmp/app.db"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("password", SPECIAL_PASSWORDS)
@pytest.mark.parametrize(
    "template",
    [
        "amqp://bob:{}@mq:5672/%2F",
        "postgresql://root:{}@127.0.0.1:5432/app",
        "postgresql+psycopg://root:{}@db1:5432,db2:5432/app?target_session_attrs=read-write",
        "amqp://alice:{}@h1/%2F,amqp://bob:{}@h2/%2F",
        "amqp://alice:{}@h1/%2F, amqps://bob:{}@h2:5671/vh",
    ],
)
def test_no_password_survives_masking(template: str, password: str) -> None:
    url = template.replace("{}", password)
    for masked in (mask_url(url), mask_text(f"cannot connect to '{url}' (code 7)")):
        assert password not in masked, masked
        for fragment in password.replace("%", " ").split():
            if len(fragment) >= 3:  # pieces long enough to mean something
                assert fragment not in masked, masked
        assert ":***@" in masked
    hosts = [h for h in ("mq", "127.0.0.1", "db1", "h1", "h2") if h in url.rsplit("@", 1)[-1]]
    for host in hosts:
        assert host in mask_url(url)


def test_a_password_in_the_query_string_is_masked() -> None:
    assert mask_url("postgresql://db/app?user=a&password=s3cret") == (
        "postgresql://db/app?user=a&password=***"
    )


def test_mask_text_finds_urls_inside_messages() -> None:
    text = 'connection to "amqp://guest:secret@mq/" failed; also postgresql://u:pw@h/d'
    assert (
        mask_text(text)
        == 'connection to "amqp://guest:***@mq/" failed; also postgresql://u:***@h/d'
    )


@pytest.mark.parametrize("password", ["secret", *SPECIAL_PASSWORDS])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_never_show_a_password(
    fmt: str, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", fmt)
    try:
        logging.getLogger("relay").warning("cannot reach %s", f"amqp://guest:{password}@mq/")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert password not in err and "guest:***@mq" in err
    if fmt == "json":
        assert json.loads(err)["level"] == "warning"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("7d", 604800), ("1.5", 1.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_says_what_it_expects() -> None:
    with pytest.raises(ConfigError, match=r"e\.g\. 500ms, 30s"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amqp_url": "http://mq/"}, "broker URL http://mq/ is not supported"),
        ({"batch_size": 0}, "batch_size must be between 1 and 10000"),
        ({"batch_size": 1}, "batch_size must be 2 or more"),
        ({"max_attempts": True}, "max_attempts must be a whole number"),
        ({"retry_min": 10, "retry_max": 1}, "retry_min .* must not exceed retry_max"),
        ({"poll_interval": 0}, "poll_interval must be more than 0"),
        ({"lease": 1}, "lease must be at least 2 seconds"),
        ({"retention": -1}, "retention must be 0"),
        ({"exchange_type": "x"}, "exchange_type must be one of"),
        ({"exchange": ""}, "default exchange"),
        ({"table": "drop table"}, "not a plain SQL identifier"),
        ({"database_url": " "}, "database URL is empty"),
        ({"database_url": "mysql://db/app"}, "not supported .* postgresql://"),
    ],
)
def test_bad_settings_say_which_and_why(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RelaySettings(**{**BASE, **change})  # type: ignore[arg-type]


def test_default_exchange_is_allowed_without_declaring() -> None:
    assert RelaySettings(**BASE, exchange="", declare_exchange=False).exchange == ""


def test_relay_names_are_unique_per_process_start() -> None:
    assert RelaySettings(**BASE).name != RelaySettings(**BASE).name


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@db/app", r"not supported \(scheme mysql://\).*postgresql\+psycopg://"),
        ("postgresql+psycopg2://db/app", "not supported"),
        ("postgresql+asyncpg://db/app", "not supported"),
        ("not a url", "is not a URL: use postgresql://"),
        ("", "database URL is empty"),
        ("postgresql://root:p@ss@db/app", "percent-encode it \\('@' as %40"),
        ("sqlite://app.db", "three slashes"),
        ("postgresql://root:a b@db/app", "' ' as %20"),
        ("postgresql://root@db1:5432,db2:5432/app", "cannot be parsed"),
    ],
)
def test_database_url_check_names_the_supported_forms(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        check_database_url(url)
    assert "p@ss" not in str(caught.value) and "ss@db" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://root@127.0.0.1:5432/app",
        "postgres://root:pw@db/app",
        "postgresql+psycopg://root:p%40ss%2F%23@db1:5432/app",
        "postgresql://root:pa/ss#?@db/app",  # SQLAlchemy reads these raw
        "sqlite:///app.db",
        "sqlite:////var/lib/app.db",
    ],
)
def test_database_urls_that_work_pass_the_check(url: str) -> None:
    assert check_database_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mq/", "scheme http://"),
        ("amqp://guest:se#cret@mq/", "percent-encode it \\('#' as %23"),
        ("amqp://guest:se/cret@mq/", "'/' as %2F"),
        ("amqp://guest:se?cret@mq/", "'\\?' as %3F"),
        ("amqp://guest:guest@mq:port/", "port that is not a number"),
        ("amqp://guest:guest@h1/,http://h2/", "scheme http://"),
        ("", "broker URL is empty"),
    ],
)
def test_amqp_url_check_says_what_to_fix(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        check_amqp_url(url)
    assert "cret" not in str(caught.value)


def test_amqp_url_lists_are_split_and_each_checked() -> None:
    assert amqp_urls("amqp://a:x@h1/%2F, amqps://b:y%23@h2:5671/v") == [
        "amqp://a:x@h1/%2F",
        "amqps://b:y%23@h2:5671/v",
    ]
