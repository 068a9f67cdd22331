"""docker-compose.yml's "cluster" profile: three RabbitMQ nodes that form one cluster, and a
relay given all three (no Docker engine here: the file is checked, not run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from relay.broker_urls import parse_amqp_urls

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_the_default_stays_one_node_and_the_profile_adds_a_cluster() -> None:
    services = _compose()["services"]
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert {"postgres", "rabbitmq", "relay"} <= default
    cluster = {name for name, s in services.items() if "cluster" in s.get("profiles", [])}
    assert cluster == {"rabbit1", "rabbit2", "rabbit3", "relay-cluster"}


def test_the_nodes_form_one_cluster_and_the_relay_knows_every_node() -> None:
    compose = _compose()
    services = compose["services"]
    names = {
        services[n]["environment"]["RABBITMQ_NODENAME"] for n in ("rabbit1", "rabbit2", "rabbit3")
    }
    assert names == {"rabbit@rabbit1", "rabbit@rabbit2", "rabbit@rabbit3"}
    cookies = {
        services[n]["environment"]["RABBITMQ_ERLANG_COOKIE"]
        for n in ("rabbit1", "rabbit2", "rabbit3")
    }
    assert len(cookies) == 1  # one cookie, or the nodes cannot talk
    conf = compose["configs"]["rabbit-cluster"]["content"]
    for name in names:
        assert f"= {name}" in conf
    for node in ("rabbit1", "rabbit2", "rabbit3"):
        assert services[node]["configs"][0]["source"] == "rabbit-cluster"
        assert services[node]["hostname"] == node
    relay = services["relay-cluster"]
    hosts = [p.host for p in parse_amqp_urls(relay["environment"]["OUTBOX_AMQP_URL"])]
    assert hosts == ["rabbit1", "rabbit2", "rabbit3"]
    for node in ("rabbit1", "rabbit2", "rabbit3"):
        assert relay["depends_on"][node]["condition"] == "service_healthy"
    assert (
        relay["environment"]["OUTBOX_DATABASE_URL"]
        == services["relay"]["environment"]["OUTBOX_DATABASE_URL"]
    )
