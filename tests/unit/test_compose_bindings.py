"""Defaults expose no more than they need: services and metrics listen on the loopback unless
a wider address is chosen explicitly."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from relay.cli.run import run

REPO = Path(__file__).resolve().parents[2]


def test_compose_publishes_every_port_on_the_loopback_only() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    published = [
        (name, str(port)) for name, service in services.items() for port in service.get("ports", [])
    ]
    assert {name for name, _ in published} >= {"postgres", "rabbitmq", "relay"}
    for name, port in published:
        assert port.startswith("127.0.0.1:"), (name, port)


def test_metrics_listen_on_the_loopback_by_default() -> None:
    (option,) = [
        p for p in run.params if isinstance(p, click.Option) and p.name == "metrics_address"
    ]
    assert option.default == "127.0.0.1"
    context = run.make_context(
        "run", ["--database-url", "sqlite:///x.db", "--amqp-url", "amqp://h/"]
    )
    assert context.params["metrics_address"] == "127.0.0.1"


def test_the_consumer_metrics_listen_on_the_loopback_by_default_too() -> None:
    from relay.cli.consume import consume

    (option,) = [
        p for p in consume.params if isinstance(p, click.Option) and p.name == "metrics_address"
    ]
    assert option.default == "127.0.0.1"
    assert option.envvar == "OUTBOX_CONSUMER_METRICS_ADDRESS"
