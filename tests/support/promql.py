"""What the dashboard and alert rules in deploy/ ask Prometheus for, and what the daemons
export, so that a test can compare the two.

`selection(expr)` reads a PromQL expression (with Grafana's `$variables`) and returns the
metric names and label names it uses. It is a tokenizer, not a full parser: an identifier is a
metric name unless it is a keyword, a function or aggregation (followed by `(`, or an
aggregation followed by `by`/`without`), a label in a matcher (`{label="..."}`) or in a
grouping clause (`by (...)`, `on (...)`, ...). Ranges (`[5m]`, `[$__rate_interval]`) and strings
are skipped. An unknown function or an unbalanced bracket is an error, so a typo cannot slip
through as "no metric here".

`exported(families)` turns metric families (a registry's `collect()`, or a scrape parsed by
`prometheus_client.parser`) into the series names a query can name, with their labels: a
counter `x` is `x_total`, a histogram `x` is `x_bucket`, `x_sum` and `x_count`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "outbox-relay.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


AGGREGATIONS = _words(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk "
    "limit_ratio"
)
FUNCTIONS = _words(
    "abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month "
    "day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count "
    "histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum "
    "holt_winters double_exponential_smoothing hour idelta increase irate label_join "
    "label_replace ln log2 log10 minute month predict_linear rate resets round scalar sgn sort "
    "sort_desc sort_by_label sort_by_label_desc sqrt time timestamp vector year avg_over_time "
    "min_over_time max_over_time sum_over_time count_over_time quantile_over_time "
    "stddev_over_time stdvar_over_time last_over_time present_over_time mad_over_time acos "
    "acosh asin asinh atan atanh cos cosh sin sinh tan tanh deg rad pi start end"
)
KEYWORDS = _words("and or unless atan2 bool offset inf nan")
GROUPING = _words("by without on ignoring group_left group_right")
TARGET_LABELS = frozenset({"job", "instance"})
"""Added by Prometheus to every scraped series."""

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<identifier>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<operator>==|!=|=~|!~|<=|>=|[-+*/%^<>=@,:])
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
    """,
    re.VERBOSE,
)
_PAIRS = {"(": ")", "{": "}", "[": "]"}


class PromQLError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Selection:
    metrics: frozenset[str]
    labels: frozenset[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromQLError(f"cannot read {expr[position:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def selection(expr: str) -> Selection:
    """The metric and label names `expr` uses (see the module's docstring)."""
    tokens = _tokens(expr)
    metrics: set[str] = set()
    labels: set[str] = set()
    stack: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "open":
            stack.append(text)
            if text == "[":  # a range or subquery: durations, variables, colons
                depth = 1
                while depth:
                    i += 1
                    if i == len(tokens):
                        raise PromQLError(f"unclosed [ in {expr!r}")
                    depth += {"[": 1, "]": -1}.get(tokens[i][1], 0)
                stack.pop()
        elif kind == "close":
            if not stack or _PAIRS[stack.pop()] != text:
                raise PromQLError(f"unbalanced {text} in {expr!r}")
        elif kind == "identifier" and stack and stack[-1] == "{":
            if following not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"{text!r} in a matcher has no operator in {expr!r}")
            labels.add(text)
        elif kind == "identifier":
            word = text.lower()
            if word in GROUPING and following == "(":
                end = _closing(tokens, i + 1, expr)
                for inner_kind, inner in tokens[i + 2 : end]:
                    if inner_kind == "identifier":
                        labels.add(inner)
                    elif inner != ",":
                        raise PromQLError(f"{inner!r} in the labels of {text} in {expr!r}")
                i = end
            elif following == "(":
                if word not in FUNCTIONS and word not in AGGREGATIONS:
                    raise PromQLError(f"unknown function {text}() in {expr!r}")
            elif word in AGGREGATIONS and following is not None and following.lower() in GROUPING:
                pass
            elif word not in KEYWORDS and word not in GROUPING:
                metrics.add(text)
        i += 1
    if stack:
        raise PromQLError(f"unclosed {stack[-1]} in {expr!r}")
    return Selection(frozenset(metrics), frozenset(labels))


def _closing(tokens: list[tuple[str, str]], start: int, expr: str) -> int:
    depth = 0
    for index in range(start, len(tokens)):
        depth += {"(": 1, ")": -1}.get(tokens[index][1], 0)
        if depth == 0:
            return index
    raise PromQLError(f"unclosed ( in {expr!r}")


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


def label_values(query: str) -> Selection:
    """A Grafana variable's `label_values(selector, label)` query, read like an expression."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise PromQLError(f"not a label_values(selector, label) query: {query!r}")
    inner = selection(match["selector"])
    return Selection(inner.metrics, inner.labels | {match["label"]})


# -- what the daemons export ---------------------------------------------------------------

_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported(families: Iterable[Any]) -> dict[str, frozenset[str]]:
    """Series name -> its label names, for every series the families can expose (also those
    with no sample yet: a labelled family's labels are read from its samples, so give each
    one at least one)."""
    series: dict[str, frozenset[str]] = {}
    for family in families:
        family_labels = frozenset(
            name for sample in family.samples for name in sample.labels if name != "le"
        )
        for suffix in _SERIES_SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = family_labels | extra
    return series


def consumer_families() -> list[Any]:
    """The consumer's metric families, built as `consume` builds them (named after the
    group), each hook called once so that every labelled series shows its labels."""
    from outbox.consumer import Message, Outcome, Result
    from relay.consumer.metrics import ConsumerMetrics

    metrics = ConsumerMetrics("billing")
    message = Message(message_id="m1", type="order.placed", key="order:1", seq=1)
    metrics.result(message, Result(Outcome.PARKED, attempts=5, reason="failed"), 0.02)
    metrics.parked(1, 1)
    metrics.queue_depth("billing.0", 3)
    metrics.outage("BrokerUnavailableError")
    return list(metrics.registry.collect())


def problems(expr: Selection, series: dict[str, frozenset[str]]) -> list[str]:
    """What `expr` names that `series` does not have: metrics, and labels none of its metrics
    carry (Prometheus's own `job` and `instance` are on every series)."""
    found = [f"metric {name} is not exported" for name in sorted(expr.metrics - series.keys())]
    carried = TARGET_LABELS.union(*(series.get(name, frozenset()) for name in expr.metrics))
    found += [
        f"label {label} is on none of {sorted(expr.metrics)}"
        for label in sorted(expr.labels - carried)
    ]
    return found


# -- the files in deploy/ ------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def alert_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, also those inside (collapsed) rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions() -> Iterator[tuple[str, Selection]]:
    """(where, what it uses) for every query of the dashboard and every alert rule."""
    board = dashboard()
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", selection(target["expr"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"variable {variable['name']}", label_values(text)
    for group in alert_rules()["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", selection(rule["expr"])


def everything_wrong(series: dict[str, frozenset[str]]) -> list[str]:
    """Every name a panel, variable or alert rule uses that `series` lacks, with its place."""
    return [
        f"{where}: {problem}" for where, used in expressions() for problem in problems(used, series)
    ]
