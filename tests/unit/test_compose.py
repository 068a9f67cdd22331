"""docker-compose.yml stays valid and speaks the CLI's language (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from relay.cli import main

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _cli_envvars(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names |= _cli_envvars(sub)
    return names


def test_services_have_health_checks_and_start_in_order() -> None:
    services = _compose()["services"]
    assert {"postgres", "rabbitmq", "relay"} <= set(services)
    for name in ("postgres", "rabbitmq", "relay"):
        assert services[name]["healthcheck"]["test"], name
    relay = services["relay"]
    assert relay["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert relay["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert relay["command"] == ["run"]
    assert "management" in services["rabbitmq"]["image"]


def test_relay_environment_uses_only_variables_the_cli_reads() -> None:
    env = _compose()["services"]["relay"]["environment"]
    known = _cli_envvars(main)
    assert {"OUTBOX_DATABASE_URL", "OUTBOX_AMQP_URL"} <= set(env)
    assert set(env) <= known, set(env) - known


def test_readme_documents_every_variable_the_compose_file_sets() -> None:
    readme = (REPO / "README.md").read_text()
    for name in _compose()["services"]["relay"]["environment"]:
        assert name in readme, name
