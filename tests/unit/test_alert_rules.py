"""The alert rules fire when they should: `promtool test rules` on their scenarios
(deploy/prometheus/alerts.test.yml).

Prometheus evaluates the rules there on synthetic series, the way the relay and the consumer
export them: counters with labels (per event type, per consumer outcome, per error) appear at
their first increment, already at 1, and `increase()` sees no change in a series' first
sample. The scenarios check that the first dead letter, the first parked message and the
first outage count, that a counter standing still does not fire, and the relay-liveness rule.

promtool comes with Prometheus (Debian's `prometheus` package; `.ci/services` puts it on the
PATH in CI). Without it the test is skipped, except in CI (`CI=true`), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support.promql import ALERTS

ALERT_TESTS = ALERTS.with_name("alerts.test.yml")


def _promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed: .ci/services should have installed it")
        pytest.skip("promtool is not installed (Debian: the prometheus package)")
    return found


def test_the_alert_rules_pass_their_promtool_scenarios() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
