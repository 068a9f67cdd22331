"""Settings are validated at the edge with messages that say what to fix; passwords never leak."""

from __future__ import annotations

import json
import logging

import pytest

from relay.errors import ConfigError
from relay.logs import configure_logging
from relay.settings import RelaySettings, parse_duration
from relay.urls import mask_text, mask_url

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


def test_mask_text_finds_urls_inside_messages() -> None:
    text = 'connection to "amqp://guest:secret@mq/" failed; also postgresql://u:pw@h/d'
    assert (
        mask_text(text)
        == 'connection to "amqp://guest:***@mq/" failed; also postgresql://u:***@h/d'
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_never_show_a_password(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", fmt)
    try:
        logging.getLogger("relay").warning("cannot reach %s", "amqp://guest:secret@mq/")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "secret" not in err and "guest:***@mq" in err
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
        ({"amqp_url": "http://mq/"}, "amqp_url must start with amqp://"),
        ({"batch_size": 0}, "batch_size must be between 1 and 10000"),
        ({"max_attempts": True}, "max_attempts must be a whole number"),
        ({"retry_min": 10, "retry_max": 1}, "retry_min .* must not exceed retry_max"),
        ({"poll_interval": 0}, "poll_interval must be more than 0"),
        ({"lease": 1}, "lease must be at least 2 seconds"),
        ({"retention": -1}, "retention must be 0"),
        ({"exchange_type": "x"}, "exchange_type must be one of"),
        ({"exchange": ""}, "default exchange"),
        ({"table": "drop table"}, "not a plain SQL identifier"),
        ({"database_url": " "}, "database_url must not be empty"),
    ],
)
def test_bad_settings_say_which_and_why(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RelaySettings(**{**BASE, **change})  # type: ignore[arg-type]


def test_default_exchange_is_allowed_without_declaring() -> None:
    assert RelaySettings(**BASE, exchange="", declare_exchange=False).exchange == ""


def test_relay_names_are_unique_per_process_start() -> None:
    assert RelaySettings(**BASE).name != RelaySettings(**BASE).name
