"""The targets of issue 6 (and issue 15's, in `bench.peer_report`) and the tables printed at
the end of a benchmark run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench import peer_report
from bench.tables import FAIL, MISS, NOT_RUN, PASS, UNEQUAL
from bench.tables import ms as _ms
from bench.tables import num as _num
from bench.tables import ratio as _ratio
from bench.tables import table as _table
from bench.tables import target as _target

__all__ = ["FAIL", "MISS", "NOT_RUN", "PASS", "UNEQUAL", "render", "targets"]

THROUGHPUT_KEYS = (100, 1000)
CPU_KEYS = 100
CPU_MAX_RATIO = 1.5
THROUGHPUT_MIN_RATIO = 0.8
LATENCY_RATE = 1000
LATENCY_MAX_P99_MS = 25.0
IDLE_MAX_QPS = 2.0
BACKLOG_MIN_RATIO = 0.85
WRITER_MAX_OVERHEAD = 0.25
FAIRNESS_MAX_RATIO = 2.0
WORK_MAX_TUPLES_PER_EVENT = 1.2


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and PASS / MISS (n/a when not measured; UNEQUAL
    for a peer comparison made at unequal load, see `bench.peer_report`)."""
    rows = []
    throughput = results.get("throughput")
    per_keys = {row["keys"]: row for row in (throughput or {}).get("per_keys", [])}
    for keys in THROUGHPUT_KEYS:
        # Against raw pika with as many messages in flight as strict per-key order allows.
        ratio = per_keys[keys]["ratio_vs_window_k"] if keys in per_keys else None
        rows.append(
            _target(
                f"throughput K={keys} / raw pika at the same window (w={keys})",
                f">= {THROUGHPUT_MIN_RATIO:.2f}x",
                ratio,
                None if ratio is None else ratio >= THROUGHPUT_MIN_RATIO,
                "{:.2f}x",
            )
        )
    cpu = per_keys[CPU_KEYS].get("cpu_ratio_vs_window_k") if CPU_KEYS in per_keys else None
    rows.append(
        _target(
            f"relay CPU per event / raw pika CPU per message, K={CPU_KEYS}",
            f"<= {CPU_MAX_RATIO:.1f}x",
            cpu,
            None if cpu is None else cpu <= CPU_MAX_RATIO,
            "{:.2f}x",
        )
    )
    latency = results.get("latency")
    p99 = None
    if latency is not None:
        for row in latency["rates"]:
            if row["rate"] == LATENCY_RATE:
                p99 = row["p99_ms"]
    rows.append(
        _target(
            f"commit-to-delivery p99 at {LATENCY_RATE}/s",
            f"< {LATENCY_MAX_P99_MS:.0f} ms",
            p99,
            None if p99 is None else p99 < LATENCY_MAX_P99_MS,
            "{:.1f} ms",
        )
    )
    idle = None if latency is None else latency["idle_queries_per_second"]
    rows.append(
        _target(
            "idle relay database queries",
            f"< {IDLE_MAX_QPS:.0f} /s",
            idle,
            None if idle is None else idle < IDLE_MAX_QPS,
            "{:.2f} /s",
        )
    )
    backlog = results.get("backlog")
    backlog_ratio = None if backlog is None else backlog["ratio"]
    rows.append(
        _target(
            "backlog: big table / small table",
            f">= {BACKLOG_MIN_RATIO:.2f}x",
            backlog_ratio,
            None if backlog_ratio is None else backlog_ratio >= BACKLOG_MIN_RATIO,
            "{:.2f}x",
        )
    )
    writer = results.get("writer")
    overhead = None if writer is None else writer["one_event_ratio"] - 1
    rows.append(
        _target(
            "writer: one event adds to a transaction",
            f"< {WRITER_MAX_OVERHEAD:.0%}",
            overhead,
            None if overhead is None else overhead < WRITER_MAX_OVERHEAD,
            "{:+.1%}",
        )
    )
    claims = results.get("claims")
    for shape, label in (("busy", "a busy key"), ("dead_head", "a busy key with a dead head")):
        fair = None if claims is None else claims["fairness"][shape]["ratio"]
        rows.append(
            _target(
                f"fairness: p99 of 50 keys behind {label} / alone",
                f"<= {FAIRNESS_MAX_RATIO:.1f}x",
                fair,
                None if fair is None else fair <= FAIRNESS_MAX_RATIO,
                "{:.2f}x",
            )
        )
    work = None if claims is None else claims["work_per_event"]["per_event"]
    rows.append(
        _target(
            "tuples the relay writes per event (100 keys)",
            f"<= {WORK_MAX_TUPLES_PER_EVENT:.1f}",
            work,
            None if work is None else work <= WORK_MAX_TUPLES_PER_EVENT,
            "{:.3f}",
        )
    )
    rows += peer_report.targets(results.get("peer"))
    checked: list[dict[str, Any]] = []
    if "throughput" in results:
        checked += [row["correctness"] for row in results["throughput"]["per_keys"]]
    checked += [results[name]["correctness"] for name in ("latency", "backlog") if name in results]
    if "peer" in results:
        checked.append(results["peer"]["correctness"]["ours"])
    if checked:
        bad = {
            kind: sum(c.get(kind, 0) for c in checked)
            for kind in ("lost", "unexpected", "duplicates", "reordered", "inconsistent")
        }
        ok = all(c["ok"] for c in checked) and all(c.get("body_sizes_ok", True) for c in checked)
        rows.append(
            {
                "name": "every relayed event delivered once, in key order",
                "goal": "0 lost/dup/reordered",
                "value": bad,
                "shown": " ".join(f"{k}={v}" for k, v in bad.items() if k != "inconsistent"),
                "status": PASS if ok else FAIL,
            }
        )
    return rows


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines: list[str] = []
    if "throughput" in results:
        lines += _throughput(results["throughput"], meta)
    if "latency" in results:
        lines += _latency(results["latency"])
    if "backlog" in results:
        lines += _backlog(results["backlog"])
    if "writer" in results:
        lines += _writer(results["writer"])
    if "claims" in results:
        lines += _claims(results["claims"])
    if "peer" in results:
        lines += peer_report.render(results["peer"])
    lines += ["", "Targets"]
    lines += _table(
        ["target", "goal", "measured", "status"],
        [[t["name"], t["goal"], t["shown"], t["status"]] for t in meta["targets"]],
    )
    start, end = meta["loadavg_start"], meta["loadavg_end"]
    lines += [
        "",
        f"repeats {meta['config']['repeat']} (medians); {meta['cpus']} CPUs; load average "
        f"{_load(start)} at start, {_load(end)} at end; {meta['elapsed_seconds']:.0f} s in all",
    ]
    return "\n".join(lines)


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _throughput(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Throughput: {result['n']:,} committed events, {result['body_size']} B bodies; "
        "events/s from start to the last confirm",
    ]
    rows = []
    for row in result["per_keys"]:
        c = row["correctness"]
        rows.append(
            [
                str(row["keys"]),
                _num(row["relay_rate"]),
                _num(row["relay_wall_rate"]),
                _num(row["baseline_rate"]),
                _ratio(row["ratio"]),
                _ratio(row["ratio_wall"]),
                f"{_num(row['baseline_k_rate'])} (w={row['baseline_k_window']})",
                _ratio(row["ratio_vs_window_k"]),
                _num(row["relay_cpu_us_per_event"]),
                _num(row.get("baseline_k_cpu_us_per_message")),
                f"{c['lost']}/{c['duplicates']}/{c['reordered']}",
            ]
        )
    lines += _table(
        [
            "K",
            "relay",
            "relay run()",
            "raw pika w=1000",
            "ratio",
            "ratio run()",
            "raw pika w=K",
            "relay/w=K",
            "relay CPU us/event",
            "raw pika w=K CPU us/msg",
            "lost/dup/reord",
        ],
        rows,
    )
    return lines


def _latency(result: dict[str, Any]) -> list[str]:
    lines = ["", "Latency: commit -> consumer arrival, one event per transaction, 100 keys"]
    rows = [
        [
            _num(r["rate"]),
            _num(r["achieved_rate"]),
            str(r["writers"]),
            _ms(r["p50_ms"]),
            _ms(r["p95_ms"]),
            _ms(r["p99_ms"]),
            _ms(r["max_ms"]),
            _num(r["samples"]),
            f"{r['relay_queries_per_event']:.2f}",
        ]
        for r in result["rates"]
    ]
    lines += _table(
        [
            "rate/s",
            "achieved/s",
            "writers",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "samples",
            "relay queries/event",
        ],
        rows,
    )
    c = result["correctness"]
    idle = result["runs"][-1]["idle"]
    lines.append(
        f"lost/dup/reordered {c['lost']}/{c['duplicates']}/{c['reordered']}; idle relay: "
        f"{result['idle_queries_per_second']:.2f} queries/s (median), in the last run "
        f"{idle['transactions_per_second']:.2f} transactions/s, "
        f"{idle['pool_checkouts_per_second']:.2f} pool checkouts/s, statements:"
    )
    by_statement: dict[str, int] = idle["by_statement"]
    seconds = idle["seconds"]
    for statement, count in by_statement.items():
        lines.append(f"  {count / seconds:5.2f}/s  {statement}")
    return lines


def _backlog(result: dict[str, Any]) -> list[str]:
    c = result["correctness"]
    return [
        "",
        f"Backlog: {result['pending']:,} pending events over {result['keys']} keys, in a table "
        f"of {result['small_rows']:,} rows vs {result['big_rows']:,} rows "
        f"(set up in {result['setup_seconds']:.0f} s)",
        *_table(
            ["small table", "big table", "ratio", "lost/dup/reord"],
            [
                [
                    f"{_num(result['small_rate'])}/s",
                    f"{_num(result['big_rate'])}/s",
                    _ratio(result["ratio"]),
                    f"{c['lost']}/{c['duplicates']}/{c['reordered']}",
                ]
            ],
        ),
    ]


def _claims(result: dict[str, Any]) -> list[str]:
    fair = result["fairness"]
    scaling = result["claims_with_relays"]
    return [
        "",
        f"Claims: fairness, 50 keys written behind {fair['busy']['backlog']:,} events of one key",
        *_table(
            ["busy key", "p99 alone", "p99 behind it", "ratio"],
            [
                [
                    shape.replace("_", " "),
                    _ms(fair[shape]["p99_alone"] * 1000),
                    _ms(fair[shape]["p99_behind_backlog"] * 1000),
                    _ratio(fair[shape]["ratio"]),
                ]
                for shape in ("busy", "dead_head")
            ],
        ),
        f"work per event: {result['work_per_event']['per_event']:.3f} tuples written by the "
        f"relay per delivered event ({result['work_per_event']['keys']} keys)",
        f"claims with several relays ({scaling['backlog']:,} events over {scaling['keys']:,} keys)",
        *_table(
            ["relays", "claims/s", "vs 1 relay"],
            [
                [n, _num(rate), _ratio(scaling["ratio_to_one"][n])]
                for n, rate in scaling["claims_per_second"].items()
            ],
        ),
    ]


def _writer(result: dict[str, Any]) -> list[str]:
    def us(kind: str) -> str:
        return f"{result[f'{kind}_median_us']:.0f} us"

    return [
        "",
        f"Writer: one order per transaction, median of {result['transactions']:,} transactions",
        *_table(
            ["transaction", "no event", "with", "ratio"],
            [
                [
                    "Core, one event",
                    us("no_event"),
                    us("one_event"),
                    _ratio(result["one_event_ratio"]),
                ],
                [
                    f"Core, {result['many_events']} events",
                    us("no_event"),
                    us("many_events"),
                    _ratio(result["many_events_ratio"]),
                ],
                [
                    "Core, SELECT 1 instead (one round trip)",
                    us("no_event"),
                    us("round_trip"),
                    _ratio(result["round_trip_ratio"]),
                ],
                [
                    "ORM aggregate, one recorded event",
                    us("orm_no_event"),
                    us("orm_one_event"),
                    _ratio(result["orm_one_event_ratio"]),
                ],
            ],
        ),
    ]
