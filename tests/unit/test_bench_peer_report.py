"""The peer benchmark's targets judge a comparison only when both sides carried the load."""

from __future__ import annotations

from typing import Any

from bench import peer_report


def _side(p50: float, p99: float, cpu: float, achieved: float) -> dict[str, Any]:
    return {"p50_ms": p50, "p99_ms": p99, "relay_cpu_seconds": cpu, "achieved_rate": achieved}


def _result(ours_at_600: float) -> dict[str, Any]:
    def row(rate: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
        return {
            "rate": rate,
            "ours": ours,
            "txoutbox": theirs,
            "p50_ms_ratio": ours["p50_ms"] / theirs["p50_ms"],
            "p99_ms_ratio": ours["p99_ms"] / theirs["p99_ms"],
            "relay_cpu_seconds_ratio": ours["relay_cpu_seconds"] / theirs["relay_cpu_seconds"],
        }

    return {
        "rates": [
            row(200, _side(2.0, 6.0, 2.0, 199.5), _side(4.0, 8.0, 2.5, 199.9)),
            row(600, _side(3.0, 9.0, 3.0, ours_at_600), _side(6.0, 12.0, 3.5, 599.5)),
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


def _statuses(result: dict[str, Any] | None) -> dict[str, str]:
    return {t["name"]: t["status"] for t in peer_report.targets(result)}


def test_a_rate_both_sides_reached_is_judged() -> None:
    statuses = _statuses(_result(ours_at_600=596.0))
    assert statuses["peer: p50 ours / txoutbox at 600/s"] == "PASS"
    assert statuses["peer: p99 ours / txoutbox at 600/s"] == "PASS"
    assert statuses["peer: relay CPU ours / txoutbox at 200/s"] == "PASS"


def test_a_rate_one_side_fell_short_of_is_not_judged() -> None:
    """Our writers reached 418 of 600 events/s: a relay under less load looks faster, so
    the 600/s figures say UNEQUAL and show both rates; 200/s is still judged."""
    targets = {t["name"]: t for t in peer_report.targets(_result(ours_at_600=418.4))}
    for figure in ("p50", "p99"):
        shown = targets[f"peer: {figure} ours / txoutbox at 600/s"]
        assert shown["status"] == "UNEQUAL"
        assert "ours 418/s" in shown["shown"] and "txoutbox 600/s" in shown["shown"]
    assert targets["peer: p50 ours / txoutbox at 200/s"]["status"] == "PASS"


def test_unmeasured_targets_stay_not_run() -> None:
    assert set(_statuses(None).values()) == {"n/a"}
