"""Relay settings: one frozen object, validated once at the edge (the CLI or the caller)."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from typing import Any

from outbox.schema import DEFAULT_TABLE, Outbox
from relay.broker_urls import parse_amqp_urls
from relay.errors import ConfigError
from relay.urls import check_amqp_url, check_database_url

DEFAULT_EXCHANGE = "outbox"
DEFAULT_EXCHANGE_TYPE = "topic"
DEFAULT_BATCH_SIZE = 2000
DEFAULT_RUN_LENGTH = 50
DEFAULT_MAX_IN_FLIGHT = 1000
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_RETRY_MIN = 1.0
DEFAULT_RETRY_MAX = 300.0
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_LEASE = 30.0
DEFAULT_RETENTION = 24 * 3600.0
DEFAULT_DB_TIMEOUT = 15.0
DEFAULT_STOP_TIMEOUT = 10.0
EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'500ms', '30s', '5m', '2h', '7d' or a plain number of seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(
            f"duration {text!r} is not understood: use a number with an optional unit, "
            "e.g. 500ms, 30s, 5m, 2h, 7d"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_relay_name() -> str:
    """Unique per process: host, pid and a random suffix (pids repeat across containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelaySettings:
    database_url: str
    amqp_url: str
    table: str = DEFAULT_TABLE
    schema: str | None = None
    exchange: str = DEFAULT_EXCHANGE
    exchange_type: str = DEFAULT_EXCHANGE_TYPE
    declare_exchange: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    run_length: int = DEFAULT_RUN_LENGTH
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_in_flight_per_key: int = 1
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_min: float = DEFAULT_RETRY_MIN
    retry_max: float = DEFAULT_RETRY_MAX
    dead_letters_hold_key: bool = True
    poll_interval: float = DEFAULT_POLL_INTERVAL
    lease: float = DEFAULT_LEASE
    retention: float = DEFAULT_RETENTION
    db_timeout: float = DEFAULT_DB_TIMEOUT
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    listen: bool = True
    until_empty: bool = False
    name: str = dataclasses.field(default_factory=default_relay_name)

    def __post_init__(self) -> None:
        check_database_url(self.database_url)
        check_amqp_url(self.amqp_url)
        parse_amqp_urls(self.amqp_url)  # and pika reads every URL of the list
        _require(
            self.exchange_type in EXCHANGE_TYPES,
            "exchange_type",
            f"must be one of {EXCHANGE_TYPES}",
        )
        _require(len(self.exchange.encode()) <= 255, "exchange", "is longer than 255 bytes")
        _require(
            not (self.exchange == "" and self.declare_exchange),
            "exchange",
            'is "" (the default exchange): it cannot be declared; pass --no-declare-exchange',
        )
        _positive_int(self.batch_size, "batch_size", maximum=10_000)
        # A claim shares its room between keys and events without a key: with room for one
        # event, one kind could starve the other.
        _require(self.batch_size >= 2, "batch_size", f"must be 2 or more, got {self.batch_size}")
        _positive_int(self.run_length, "run_length", maximum=10_000)
        _positive_int(self.max_in_flight, "max_in_flight", maximum=100_000)
        _positive_int(self.max_in_flight_per_key, "max_in_flight_per_key", maximum=1000)
        _positive_int(self.max_attempts, "max_attempts", maximum=1_000_000)
        for field in (
            "retry_min",
            "retry_max",
            "poll_interval",
            "lease",
            "db_timeout",
            "stop_timeout",
        ):
            value = getattr(self, field)
            _require(value > 0, field, f"must be more than 0 seconds, got {value}")
        _require(
            self.retry_min <= self.retry_max,
            "retry_min",
            f"({self.retry_min}s) must not exceed retry_max ({self.retry_max}s)",
        )
        _require(self.retention >= 0, "retention", "must be 0 (delete once published) or more")
        _require(
            self.lease >= 2.0, "lease", "must be at least 2 seconds, to leave time to renew it"
        )
        _require(bool(self.name) and len(self.name) <= 200, "name", "must be 1 to 200 characters")
        # Validates the table and schema names with the outbox's own rules.
        try:
            Outbox(table=self.table, schema=self.schema)
        except Exception as exc:
            raise ConfigError(str(exc)) from None

    def outbox(self) -> Outbox:
        return Outbox(table=self.table, schema=self.schema)

    def replace(self, **changes: Any) -> RelaySettings:
        return dataclasses.replace(self, **changes)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field} {message}")


def _positive_int(value: int, field: str, *, maximum: int) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool), field, "must be a whole number"
    )
    _require(1 <= value <= maximum, field, f"must be between 1 and {maximum}, got {value}")
