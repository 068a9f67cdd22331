"""Several broker addresses: the nodes of a RabbitMQ cluster, in the order to try them.

`--amqp-url` (and `OUTBOX_AMQP_URL`) takes a comma-separated list of URLs, or the option
repeated. Commas split only where the next URL starts (a scheme and `://`), so a comma inside a
password or a query does not cut a URL in two, and a URL of another scheme is named as wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

import pika

from relay.errors import ConfigError
from relay.urls import mask_text, split_url_list


def split_amqp_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list, stripped (empty parts dropped)."""
    return tuple(split_url_list(value))


def join_amqp_urls(values: Iterable[str]) -> str:
    """Several option values (each maybe a list itself) as one comma-separated list."""
    return ",".join(url for value in values for url in split_amqp_urls(value))


def parse_amqp_urls(value: str) -> tuple[pika.URLParameters, ...]:
    """pika parameters for every URL of the list; a `ConfigError` naming the bad one."""
    urls = split_amqp_urls(value)
    if not urls:
        raise ConfigError("amqp_url must not be empty (amqp://user:pass@host:5672/%2F)")
    parsed = []
    for url in urls:
        if not url.lower().startswith(("amqp://", "amqps://")):
            raise ConfigError(
                f"amqp_url must start with amqp:// or amqps:// ({mask_text(url)!r} does not; "
                "separate several URLs with commas)"
            )
        try:
            parsed.append(pika.URLParameters(url))
        except Exception as exc:
            detail = mask_text(str(exc))
            raise ConfigError(f"amqp_url {mask_text(url)!r} is not valid: {detail}") from exc
    return tuple(parsed)


def node_label(params: pika.URLParameters | pika.ConnectionParameters) -> str:
    """`host:port`: how logs and metrics name the node a relay is connected to."""
    return f"{params.host}:{params.port}"
