"""Several broker addresses: a comma-separated list or the option repeated, in order."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from relay.broker_urls import join_amqp_urls, node_label, parse_amqp_urls, split_amqp_urls
from relay.cli.options import amqp_option
from relay.errors import ConfigError
from relay.messages import BrokerStatus
from relay.prometheus import PrometheusMetrics
from relay.settings import RelaySettings
from tests.unit.test_relay_loop import Harness

A = "amqp://u:p@a:5672/%2F"
B = "amqps://u:p,w@b:5671/v"  # a comma inside the password does not split it
C = "amqp://c/"


def test_a_list_splits_only_where_the_next_url_starts() -> None:
    assert split_amqp_urls(f" {A} , {B},{C} ") == (A, B, C)
    assert split_amqp_urls(A) == (A,)
    assert join_amqp_urls([f"{A},{B}", C]) == f"{A},{B},{C}"
    assert [node_label(p) for p in parse_amqp_urls(f"{A},{B},{C}")] == [
        "a:5672",
        "b:5671",
        "c:5672",
    ]


@pytest.mark.parametrize("value", ["", " , ", f"{A},http://x/", "amqp-ish"])
def test_a_bad_list_names_what_to_fix_without_the_password(value: str) -> None:
    with pytest.raises(ConfigError, match="amqp_url must") as error:
        parse_amqp_urls(value)
    assert ":p@" not in str(error.value)


def test_settings_accept_a_list() -> None:
    settings = RelaySettings(database_url="sqlite:///relay.db", amqp_url=f"{A},{C}")
    assert split_amqp_urls(settings.amqp_url) == (A, C)


@click.command()
@amqp_option()
def show(amqp_url: str) -> None:
    click.echo(amqp_url)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--amqp-url", A, "--amqp-url", C], {}, f"{A},{C}"),
        (["--amqp-url", f"{A},{B}"], {}, f"{A},{B}"),
        ([], {"OUTBOX_AMQP_URL": f"{A},{C}"}, f"{A},{C}"),
    ],
)
def test_the_option_takes_a_list_repeated_or_from_the_variable(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    result = CliRunner(env=env).invoke(show, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected


def test_the_option_is_still_required() -> None:
    result = CliRunner(env={"OUTBOX_AMQP_URL": ""}).invoke(show, [])
    assert result.exit_code == 2 and "Missing option" in result.output


def test_metrics_name_the_node_the_relay_is_connected_to(tmp_path: Path) -> None:
    """The relay hands the node of every `up` status to its metrics; the Prometheus gauge is 1
    for the current node and 0 for the nodes it was on before."""
    h = Harness(tmp_path)
    metrics = PrometheusMetrics()
    h.relay.metrics = metrics
    h.publisher.sink([BrokerStatus(up=True, node="n1:5672")])
    h.step()
    h.publisher.sink([BrokerStatus(up=False, error="gone", node="n1:5672")])
    h.publisher.sink([BrokerStatus(up=True, node="n2:5672")])
    h.step()
    value = metrics.registry.get_sample_value
    assert value("outbox_relay_broker_node", {"node": "n2:5672"}) == 1
    assert value("outbox_relay_broker_node", {"node": "n1:5672"}) == 0
    assert value("outbox_relay_broker_up", {}) == 1
    h.engine.dispose()
