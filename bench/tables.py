"""The pieces every benchmark's report is made of: a judged target and a plain-text table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PASS = "PASS"
MISS = "MISS"  # a goal not reached: reported, not a failure of the run
FAIL = "FAIL"  # a correctness check failed: the run exits 1
NOT_RUN = "n/a"
# Measured, but not judged: the writers it depends on fell short of the rate (bench/peer_report.py).
UNEQUAL = "UNEQUAL"


def target(name: str, goal: str, value: float | None, ok: bool | None, fmt: str) -> dict[str, Any]:
    return {
        "name": name,
        "goal": goal,
        "value": value,
        "shown": "-" if value is None else fmt.format(value),
        "status": NOT_RUN if ok is None else PASS if ok else MISS,
    }


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]
