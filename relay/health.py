"""Health checks for `outbox-relay health`: is the database reachable with the outbox tables in
place, and does the broker accept a connection? Each check answers in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions

from relay.admin import Admin
from relay.broker_urls import split_amqp_urls
from relay.errors import (
    BrokerUnavailableError,
    DatabaseUnavailableError,
    RelayError,
    SchemaMissingError,
)
from relay.urls import mask_text, mask_url

BROKER_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    service: str  # "database" or "broker"
    ok: bool
    detail: str  # one line for people
    error: RelayError | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def open_broker(
    amqp_url: str, *, connection_name: str, timeout: float = BROKER_TIMEOUT
) -> pika.BlockingConnection:
    """A blocking connection to the first node of the list that answers (fails fast); errors
    become `BrokerUnavailableError` (the last node's)."""
    urls = split_amqp_urls(amqp_url) or (amqp_url,)
    for url in urls[:-1]:
        with contextlib.suppress(BrokerUnavailableError):
            return _open_one(url, connection_name=connection_name, timeout=timeout)
    return _open_one(urls[-1], connection_name=connection_name, timeout=timeout)


def _open_one(amqp_url: str, *, connection_name: str, timeout: float) -> pika.BlockingConnection:
    try:
        params = pika.URLParameters(amqp_url)
    except Exception as exc:
        raise BrokerUnavailableError(f"broker URL is not valid: {mask_text(str(exc))}") from exc
    params.client_properties = {"connection_name": connection_name}
    params.connection_attempts = 1
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    try:
        with _quiet_pika():
            return pika.BlockingConnection(params)
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailableError(
            "broker refused the credentials (check the user and password in the URL)"
        ) from exc
    except pika.exceptions.ProbableAccessDeniedError as exc:
        raise BrokerUnavailableError(
            "broker refused access to the virtual host (check the vhost in the URL)"
        ) from exc
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailableError(f"broker unavailable: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """One line; pika's connection errors often have an empty str() but an informative repr."""
    text = (str(exc).strip() or repr(exc)).splitlines()[0]
    name = type(exc).__name__
    return mask_text(text if text.startswith(name) else f"{name}: {text}")


@contextlib.contextmanager
def _quiet_pika() -> Iterator[None]:
    """pika logs a failed connection at ERROR with tracebacks; the caller reports it in one
    line instead."""
    logger = logging.getLogger("pika")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_database(admin: Admin, database_url: str) -> Check:
    where = f"{mask_url(database_url)}, table {admin.outbox.qualified_name}"
    try:
        schema = admin.check()
    except RelayError as exc:
        if isinstance(exc, DatabaseUnavailableError):
            where += "; set by --database-url / OUTBOX_DATABASE_URL"
        return Check("database", False, f"{exc} ({where})", exc)
    if not schema.ok:
        error = SchemaMissingError("; ".join(schema.errors))
        return Check("database", False, f"{error} ({where})", error)
    warnings = "".join(f"; warning: {w}" for w in schema.warnings)
    return Check("database", True, f"ok ({where}){warnings}")


def check_broker(amqp_url: str, *, timeout: float = BROKER_TIMEOUT) -> Check:
    where = ",".join(mask_url(url) for url in split_amqp_urls(amqp_url)) or mask_url(amqp_url)
    try:
        connection = open_broker(amqp_url, connection_name="outbox-relay:health", timeout=timeout)
    except BrokerUnavailableError as exc:
        where += "; set by --amqp-url / OUTBOX_AMQP_URL"
        return Check("broker", False, f"{exc} ({where})", exc)
    with contextlib.suppress(Exception):  # already gone: the check itself succeeded
        connection.close()
    return Check("broker", True, f"ok ({where})")
