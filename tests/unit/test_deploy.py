"""The Grafana dashboard and the Prometheus alert rules in deploy/ ask only for what the relay
and the consumer export, are well formed, cover every exported metric, and tell the operator
commands that exist.

The exported series come from the daemons' own registries, built as `outbox-relay run` and
`outbox-relay consume` build them (the relay's outbox gauges read from a real SQLite outbox
through `Admin.gauges`), each hook called once so that labelled series show their labels.
tests/integration/test_metrics_endpoint.py scrapes a running relay over HTTP for the same check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.admin import Admin
from relay.cli import main
from relay.prometheus import PrometheusMetrics
from tests.support import promql
from tests.support.promql import PromQLError, Selection, selection
from tests.support.relays import write_events

Series = dict[str, frozenset[str]]


def relay_families(tmp_path: Path) -> list[Any]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/outbox.db")
    box = Outbox()
    box.create(engine)
    write_events(engine, box, [Event(type="order.placed", key="order:1")])
    metrics = PrometheusMetrics()
    metrics.watch_outbox(Admin(engine, box).gauges)  # as `run` does
    metrics.claimed(1)
    metrics.published("order.placed", commit_to_confirm=0.2, publish_to_confirm=0.01)
    metrics.failed("order.placed", dead=True)
    metrics.lease_lost(1)
    metrics.broker_up(True)
    metrics.broker_node("rabbit1:5672")
    metrics.database_up(True)
    try:
        return list(metrics.registry.collect())
    finally:
        engine.dispose()


@pytest.fixture
def families(tmp_path: Path) -> list[Any]:
    return relay_families(tmp_path) + promql.consumer_families()


@pytest.fixture
def series(families: list[Any]) -> Series:
    return promql.exported(families)


# -- the check itself ------------------------------------------------------------------------


def test_every_metric_and_label_the_dashboard_and_the_alerts_name_is_exported(
    series: Series,
) -> None:
    assert promql.everything_wrong(series) == []


def test_the_check_reads_every_panel_variable_and_rule() -> None:
    places = [where for where, _ in promql.expressions()]
    targets = sum(len(p.get("targets", [])) for p in promql.panels(promql.dashboard()))
    rules = sum(len(g["rules"]) for g in promql.alert_rules()["groups"])
    assert len(places) == targets + rules + 1  # + the consumer variable
    assert targets >= 20 and rules >= 12


def test_a_panel_naming_a_metric_that_does_not_exist_fails_the_check(
    series: Series, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = promql.dashboard()
    panel = next(p for p in promql.panels(board) if p.get("targets"))
    panel["targets"][0]["expr"] = "max(outbox_relay_oldest_pending_age)"  # `_seconds` missing
    monkeypatch.setattr(promql, "dashboard", lambda: board)
    assert promql.everything_wrong(series) == [
        f"panel {panel['title']!r} A: metric outbox_relay_oldest_pending_age is not exported"
    ]


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("outbox_relay_pending_event", "metric outbox_relay_pending_event is not exported"),
        # A counter is queried as `_total`, a histogram by its `_bucket`, `_sum`, `_count`.
        ("rate(outbox_relay_events_published[5m])", "metric outbox_relay_events_published is"),
        ("outbox_relay_publish_seconds", "metric outbox_relay_publish_seconds is not"),
        ("outbox_relay_pending_events_total", "metric outbox_relay_pending_events_total is"),
        ('outbox_relay_dead_events{event_type="x"}', "label event_type is on none of"),
        ("sum by (queue) (outbox_consumer_parked_keys)", "label queue is on none of"),
    ],
)
def test_names_that_are_not_exported_are_reported(series: Series, expr: str, problem: str) -> None:
    [found] = promql.problems(selection(expr), series)
    assert found.startswith(problem)


def test_exported_names_follow_the_family_type(series: Series) -> None:
    assert {"outbox_relay_events_published_total", "outbox_relay_pending_events"} <= set(series)
    assert {f"outbox_relay_publish_seconds{s}" for s in ("_bucket", "_sum", "_count")} <= set(
        series
    )
    assert "outbox_relay_events_published" not in series
    assert series["outbox_relay_events_published_total"] == {"event_type"}
    assert series["outbox_consumer_handle_seconds_bucket"] == {"consumer", "type", "le"}


# -- the extractor -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ("up", {"up"}, set()),
        ('a_total{x="1", y=~"$v|b"}', {"a_total"}, {"x", "y"}),
        ("rate(a_total[5m])", {"a_total"}, set()),
        (
            "rate(a_total[$__rate_interval]) / rate(b_total[1h30m:1m])",
            {"a_total", "b_total"},
            set(),
        ),
        (
            "histogram_quantile(0.99, sum by (le, c) (rate(h_bucket[5m])))",
            {"h_bucket"},
            {"le", "c"},
        ),
        ("sum(rate(a_total[5m])) without (pod) > 0", {"a_total"}, {"pod"}),
        ("absent(g) or max(g) < 1", {"g"}, set()),
        ("a / on (i) group_left (n) b", {"a", "b"}, {"i", "n"}),
        ("a > bool 1e3 unless b offset 5m", {"a", "b"}, set()),
        ('count by (x) (a == 1) and ignoring (y) b{z!~"q"}', {"a", "b"}, {"x", "y", "z"}),
        ("max(ns:rule_metric:rate5m)", {"ns:rule_metric:rate5m"}, set()),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}, set()),
    ],
)
def test_the_extractor_finds_metric_and_label_names(
    expr: str, metrics: set[str], labels: set[str]
) -> None:
    assert selection(expr) == Selection(frozenset(metrics), frozenset(labels))


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("rat(a_total[5m])", "unknown function rat()"),
        ("sum(rate(a_total[5m])", "unclosed ("),
        ("a_total{x}", "has no operator"),
        ("sum(a))", "unbalanced )"),
        ("a_total[5m", "unclosed ["),
        ("a ; b", "cannot read"),
    ],
)
def test_the_extractor_refuses_what_it_cannot_read(expr: str, error: str) -> None:
    with pytest.raises(PromQLError, match=re.escape(error)):
        selection(expr)


def test_label_values_queries_name_their_metric_and_label() -> None:
    assert promql.label_values("label_values(m_total{a='b'}, consumer)") == Selection(
        frozenset({"m_total"}), frozenset({"a", "consumer"})
    )
    with pytest.raises(PromQLError):
        promql.label_values("query_result(m_total)")


# -- coverage ----------------------------------------------------------------------------------


def test_the_dashboard_shows_every_exported_metric(families: list[Any]) -> None:
    shown: set[str] = set()
    for panel in promql.panels(promql.dashboard()):
        for target in panel.get("targets", []):
            shown |= selection(target["expr"]).metrics
    unshown = [f.name for f in families if not promql.exported([f]).keys() & shown]
    assert unshown == []
    assert len(families) == 21  # the relay's 15 and the consumer's 6: no empty registry


ALERTS_WANTED = {
    "OutboxNoRelayAlive": {"outbox_relay_active_relays"},
    "OutboxOldestPendingAgeHigh": {"outbox_relay_oldest_pending_age_seconds"},
    "OutboxDeadLetters": {"outbox_relay_dead_events"},
    "OutboxDeadLettersGrowing": {"outbox_relay_events_dead_lettered_total"},
    "OutboxHeldKeys": {"outbox_relay_held_keys"},
    "OutboxRelayBrokerDown": {"outbox_relay_broker_up"},
    "OutboxRelayDatabaseDown": {"outbox_relay_database_up"},
    "OutboxRelayLeaseLost": {"outbox_relay_lease_lost_total"},
    "OutboxConsumerParking": {"outbox_consumer_messages_total"},
    "OutboxConsumerParkedKeys": {"outbox_consumer_parked_keys"},
    "OutboxConsumerLag": {"outbox_consumer_queue_messages"},
}


def test_the_alerts_an_operator_needs_are_there() -> None:
    rules = {r["alert"]: r for g in promql.alert_rules()["groups"] for r in g["rules"]}
    for name, metrics in ALERTS_WANTED.items():
        assert name in rules, name
        assert selection(rules[name]["expr"]).metrics == metrics, name


# -- structure ---------------------------------------------------------------------------------

DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")
RULE_KEYS = {"alert", "expr", "for", "labels", "annotations"}


def test_the_alert_rules_file_has_the_structure_prometheus_loads() -> None:
    document = promql.alert_rules()
    assert set(document) == {"groups"}
    groups = document["groups"]
    assert [g["name"] for g in groups] == ["outbox-relay", "outbox-consumer"]
    names: list[str] = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"}, group.keys()
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) == RULE_KEYS, rule
            names.append(rule["alert"])
            assert re.fullmatch(r"Outbox[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert DURATION.match(rule["for"]), rule
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule
            assert set(rule["annotations"]) == {"summary", "description"}, rule
            for text in rule["annotations"].values():
                assert text.count("{{") == text.count("}}"), text
    assert len(names) == len(set(names))


def cli_command(words: list[str]) -> tuple[click.Command, int]:
    """The command `words` name, and how many of the words name it."""
    command: click.Command = main
    depth = 0
    for word in words:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command, depth = command.commands[word], depth + 1
    return command, depth


def test_every_command_the_alerts_tell_operators_to_run_exists() -> None:
    named: list[str] = []
    for group in promql.alert_rules()["groups"]:
        for rule in group["rules"]:
            named += re.findall(r"`(outbox-relay [^`]+)`", rule["annotations"]["description"])
    assert len(named) >= 15
    for line in named:
        words = line.split()[1:]
        command, depth = cli_command(words)
        assert not isinstance(command, click.Group), f"{line!r} names no command"
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        for word in words[depth:]:
            if word.startswith("--"):
                assert word in options, f"{line!r}: {command.name} has no {word}"


def test_the_dashboard_has_the_structure_grafana_imports() -> None:
    board = promql.dashboard()
    assert {"title", "uid", "schemaVersion", "panels", "templating", "time"} <= set(board)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids: list[int] = []
    occupied: set[tuple[int, int]] = set()
    for panel in promql.panels(board):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']!r} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries"} and panel["title"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip() and "legendFormat" in target
    assert len(ids) == len(set(ids))


def test_the_consumer_variable_filters_the_consumer_panels() -> None:
    consumer_targets: list[dict[str, Any]] = [
        t
        for p in promql.panels(promql.dashboard())
        for t in p.get("targets", [])
        if "outbox_consumer_" in t["expr"]
    ]
    assert consumer_targets
    for target in consumer_targets:
        assert 'consumer=~"$consumer"' in target["expr"], target["expr"]
