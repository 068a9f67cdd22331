"""`python -m bench.consumer --quick` runs and checks the inbox run (never timings)."""

from __future__ import annotations

import json

import pytest

from bench.consumer import main

pytestmark = pytest.mark.slow


def test_the_consumer_benchmark_runs_and_checks_its_results(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--quick", "--latency"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] is True
    assert set(result["rates"]) == {"inbox", "raw+tx", "raw"}
    assert result["latency"]["ok"] is True and result["latency"]["events"] == 100
