"""`python -m bench`: run the benchmarks, print a table, save the results as JSON.

    python -m bench                      # everything, 3 repeats (several minutes)
    python -m bench --quick              # tiny sizes, seconds (what the smoke test runs)
    python -m bench --only throughput -n 5000 --repeat 5

Exit codes: 0 done (targets may be missed: see the table), 1 a correctness check failed
(an event lost, duplicated or reordered), 2 bad usage or a service unreachable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pika.exceptions
import sqlalchemy as sa

from bench import backlog, claims, latency, peer, report, throughput, writer_cost
from bench.baseline import BaselineError
from bench.config import BENCHMARKS, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, BenchConfig
from relay.demo import ensure_database
from relay.errors import RelayError

EXIT_OK = 0
EXIT_INCORRECT = 1
EXIT_USAGE = 2
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

RUNNERS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "throughput": throughput.run,
    "latency": latency.run,
    "backlog": backlog.run,
    "writer": writer_cost.run,
    "claims": claims.run,
    "peer": peer.run,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the outbox relay against baselines measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds per benchmark")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 3)")
    parser.add_argument("-n", type=int, default=None, help="events per throughput run (20000)")
    parser.add_argument(
        "--keys",
        type=int,
        action="append",
        default=None,
        metavar="K",
        help="ordering keys of a throughput run (repeatable; default 1, 10, 100 and 1000)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("OUTBOX_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL (env OUTBOX_BENCH_DATABASE_URL); each run uses a schema of its own",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("OUTBOX_BENCH_AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ (env OUTBOX_BENCH_AMQP_URL); queues and exchanges get unique names",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON file (default bench/results/<time>.json)"
    )
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    changes: dict[str, Any] = {"database_url": args.database_url, "amqp_url": args.amqp_url}
    if args.repeat is not None:
        changes["repeat"] = args.repeat
    elif args.quick:
        changes["repeat"] = 1
    if args.n is not None:
        changes["n"] = args.n
    if args.keys:
        changes["keys"] = tuple(args.keys)
    if args.quick:
        return BenchConfig.quick_config(**changes)
    return BenchConfig(**changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = make_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    selected = [name for name in BENCHMARKS if not args.only or name in args.only]
    unavailable = peer.missing_extra()
    if "peer" in selected and unavailable is not None:
        if args.only:
            print(f"error: {unavailable}", file=sys.stderr)
            return EXIT_USAGE
        print(f"note: peer benchmark skipped: {unavailable}", file=sys.stderr)
        selected.remove("peer")
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    loadavg_start = os.getloadavg()
    code_at_start = code_fingerprint()
    results: dict[str, Any] = {}
    try:
        ensure_database(config.database_url)
        for name in selected:
            began = time.monotonic()
            results[name] = RUNNERS[name](config)
            results[name]["seconds"] = round(time.monotonic() - began, 1)
    except (
        sa.exc.OperationalError,
        pika.exceptions.AMQPConnectionError,
        BaselineError,
        RelayError,
    ) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("is PostgreSQL / RabbitMQ running? (make services)", file=sys.stderr)
        return EXIT_USAGE
    meta: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "loadavg_start": [round(v, 2) for v in loadavg_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "host": platform.node(),
        "config": config.as_dict(),
        "code": code_at_start,
    }
    if code_fingerprint() != code_at_start:
        meta["code"]["changed_during_run"] = code_fingerprint()
    output = args.output or RESULTS_DIR / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        output.write_text(json.dumps({**meta, "results": results}, indent=2, default=str) + "\n")

    save()  # first unjudged: a fault in judging must not lose the measurements
    meta["targets"] = report.targets(results)
    save()
    print(report.render(results, meta))
    print(f"\nresults saved to {output}")
    incorrect = any(t["status"] == report.FAIL for t in meta["targets"])
    return EXIT_INCORRECT if incorrect else EXIT_OK


def code_fingerprint() -> dict[str, str]:
    """Which relay and outbox code was measured (other people change it while benchmarks run):
    a hash of the sources and the time of the newest change."""
    digest = hashlib.sha256()
    newest = 0.0
    for path in sorted([*REPO.glob("relay/**/*.py"), *REPO.glob("outbox/**/*.py")]):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    changed = dt.datetime.fromtimestamp(newest, dt.UTC).isoformat(timespec="seconds")
    return {"relay_outbox_sha256": digest.hexdigest()[:16], "newest_change": changed}
