"""The peer benchmark's targets judge a figure only when the writers carried the load."""

from __future__ import annotations

from typing import Any

import pytest

from bench import peer_report

FULL = {200: 199.5, 600: 596.0}


def _side(p50: float, p99: float, cpu: float, least: float | None) -> dict[str, Any]:
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "relay_cpu_seconds": cpu,
        "achieved_rate": least,
        "least_achieved_rate": least,
    }


def _row(rate: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    return {
        "rate": rate,
        "ours": ours,
        "txoutbox": theirs,
        "p50_ms_ratio": ours["p50_ms"] / theirs["p50_ms"],
        "p99_ms_ratio": ours["p99_ms"] / theirs["p99_ms"],
        "relay_cpu_seconds_ratio": ours["relay_cpu_seconds"] / theirs["relay_cpu_seconds"],
    }


def _result(
    ours: dict[int, float | None] = FULL, theirs: dict[int, float | None] = FULL
) -> dict[str, Any]:
    return {
        "rates": [
            _row(200, _side(2.0, 6.0, 2.0, ours[200]), _side(4.0, 8.0, 2.5, theirs[200])),
            _row(600, _side(3.0, 9.0, 3.0, ours[600]), _side(6.0, 12.0, 3.5, theirs[600])),
        ],
        "throughput": {"keys": 100, "ratio": 5.2},
        "correctness": {
            "txoutbox": {
                "ok": True,
                "body_sizes_ok": True,
                "lost": 0,
                "duplicates": 0,
                "reordered": 0,
            },
        },
    }


def _targets(result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in peer_report.targets(result)}


def _status(result: dict[str, Any] | None) -> dict[str, str]:
    return {name: t["status"] for name, t in _targets(result).items()}


def test_rates_every_run_reached_are_judged() -> None:
    assert set(_status(_result()).values()) == {"PASS"}


def test_a_rate_our_writers_fell_short_of_is_not_judged() -> None:
    """Our slowest run reached 344 of 600 events/s: a relay under less load looks faster,
    so the 600/s comparisons say UNEQUAL and show the rates; 200/s is still judged."""
    targets = _targets(_result(ours={200: 199.5, 600: 344.4}))
    for figure in ("p50", "p99"):
        shown = targets[f"peer: {figure} ours / txoutbox at 600/s"]
        assert shown["status"] == "UNEQUAL"
        assert "ours 344.4/s" in shown["shown"] and "txoutbox 596.0/s" in shown["shown"]
    assert targets["peer: p50 ours / txoutbox at 200/s"]["status"] == "PASS"


def test_a_rate_txoutbox_fell_short_of_is_not_judged_either() -> None:
    statuses = _status(_result(theirs={200: 150.0, 600: 596.0}))
    assert statuses["peer: p50 ours / txoutbox at 200/s"] == "UNEQUAL"
    assert statuses["peer: relay CPU ours / txoutbox at 200/s"] == "UNEQUAL"
    # Our own absolute figures need only our writers at the rate.
    assert statuses["peer: our commit-to-delivery p50 at 200/s"] == "PASS"


def test_our_absolute_figures_need_our_writers_at_the_rate() -> None:
    statuses = _status(_result(ours={200: 150.0, 600: 596.0}))
    assert statuses["peer: our commit-to-delivery p50 at 200/s"] == "UNEQUAL"
    assert statuses["peer: our commit-to-delivery p99 at 200/s"] == "UNEQUAL"
    assert statuses["peer: relay CPU ours / txoutbox at 200/s"] == "UNEQUAL"


@pytest.mark.parametrize("missing", ["none", "absent"])
def test_an_unknown_rate_is_not_judged_and_does_not_crash(missing: str) -> None:
    """A run whose writers' span was empty has no achieved rate, and a side may have no
    slowest run recorded at all."""
    result = _result()
    side = result["rates"][0]["ours"]
    if missing == "none":
        side["least_achieved_rate"] = None
    else:
        del side["least_achieved_rate"], side["achieved_rate"]
    targets = _targets(result)
    assert targets["peer: p50 ours / txoutbox at 200/s"]["status"] == "UNEQUAL"
    assert "ours -/s" in targets["peer: p50 ours / txoutbox at 200/s"]["shown"]


def test_the_median_rate_does_not_stand_in_for_the_slowest_run() -> None:
    """A median at the rate can hide a short run, whose latency may set the median."""
    result = _result()
    del result["rates"][1]["ours"]["least_achieved_rate"]
    result["rates"][1]["ours"]["achieved_rate"] = 596.0  # the median reached it
    assert _status(result)["peer: p50 ours / txoutbox at 600/s"] == "UNEQUAL"


def test_unmeasured_targets_stay_not_run() -> None:
    assert set(_status(None).values()) == {"n/a"}
