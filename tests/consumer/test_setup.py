"""The consistent-hash exchange plugin is enabled wherever the consumer runs.

On the local broker, tests/consumer/test_runner.py declares such exchanges."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_enables_the_plugin_before_rabbitmq_starts() -> None:
    rabbitmq = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["rabbitmq"]
    command = " ".join(rabbitmq["command"])
    assert "rabbitmq-plugins enable --offline rabbitmq_consistent_hash_exchange &&" in command
    assert command.endswith("exec docker-entrypoint.sh rabbitmq-server")


def test_ci_services_enables_the_plugin_and_checks_it() -> None:
    services = (REPO / ".ci" / "services").read_text()
    assert "rabbitmq-plugins -q enable rabbitmq_consistent_hash_exchange" in services
    assert "is_enabled rabbitmq_consistent_hash_exchange" in services
