"""What people and scripts see: aligned tables, ages and times, JSON, and the admin results."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from relay.admin_records import DeadLetter, EventDetail, OutboxStatus

LAST_ERROR_WIDTH = 70


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns, headers first; the last column is never padded."""
    table = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def format_time(value: dt.datetime | None) -> str:
    from relay.admin_records import as_utc

    moment = as_utc(value)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment is not None else "-"


def shorten(text: str | None, width: int) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def render_status(s: OutboxStatus) -> list[str]:
    rows = [
        ["pending", str(s.pending), ""],
        ["  in flight", str(s.in_flight), "leased by a relay"],
        ["  waiting for retry", str(s.waiting_retry), ""],
        ["dead", str(s.dead), "see `outbox-relay dead list`" if s.dead else ""],
        ["published", str(s.published), "kept for retention"],
        ["oldest pending", format_age(s.oldest_pending_age), ""],
        ["keys held back", str(s.keys_held_back), "behind a dead or retrying event"],
        ["active relays", str(len(s.relays)), "heartbeat in the last 30 s"],
    ]
    lines = [f"outbox {s.table} at {format_time(s.checked_at)}", ""]
    lines += format_table(["", "", ""], rows)[1:]
    if s.schema_problems:
        lines.append("")
        lines += [f"warning: {problem}" for problem in s.schema_problems]
    if s.relays:
        lines.append("")
        lines += [
            "  " + line
            for line in format_table(
                ["RELAY", "HOST", "PID", "BROKER NODE", "STARTED", "LAST HEARTBEAT"],
                [
                    [
                        r.name,
                        r.host,
                        str(r.pid),
                        r.broker_node or "-",
                        format_time(r.started_at),
                        format_time(r.heartbeat_at),
                    ]
                    for r in s.relays
                ],
            )
        ]
    return lines


def render_dead_letters(letters: Sequence[DeadLetter]) -> list[str]:
    return format_table(
        ["ID", "TYPE", "KEY", "ATTEMPTS", "LAST FAILURE", "LAST ERROR"],
        [
            [
                str(d.id),
                d.type,
                d.key or "-",
                str(d.attempts),
                format_time(d.last_failed_at),
                shorten(d.last_error, LAST_ERROR_WIDTH),
            ]
            for d in letters
        ],
    )


def render_event(detail: EventDetail) -> list[str]:
    data = detail.to_json()
    fields = [
        ("event", data["id"]),
        ("status", data["status"]),
        ("type", data["type"]),
        ("key", data["key"] or "-"),
        ("aggregate", f"{data['aggregate_type'] or '-'} {data['aggregate_id'] or ''}".strip()),
        ("routing key", data["routing_key"]),
        ("correlation id", data["correlation_id"] or "-"),
        ("version", str(data["version"])),
        ("seq", str(data["seq"])),
        ("occurred at", data["occurred_at"] or "-"),
        ("attempts", str(data["attempts"])),
        ("next attempt", data["next_attempt_at"] or "-"),
        ("published at", data["published_at"] or "-"),
        ("last error", data["last_error"] or "-"),
        ("headers", json.dumps(data["headers"], ensure_ascii=False)),
    ]
    width = max(len(label) for label, _ in fields)
    lines = [f"{label:<{width}}  {value}" for label, value in fields]
    payload = json.dumps(data["payload"], indent=2, ensure_ascii=False)
    lines += ["payload:", *["  " + line for line in payload.splitlines()]]
    if detail.failures:
        lines.append(f"failures ({len(detail.failures)}, oldest first):")
        lines += [
            "  " + line
            for line in format_table(
                ["ATTEMPT", "FAILED AT", "RELAY", "ERROR"],
                [
                    [str(f.attempt), format_time(f.failed_at), f.relay or "-", f.error]
                    for f in detail.failures
                ],
            )
        ]
    else:
        lines.append("failures: none recorded")
    return lines
