"""`outbox-relay consume` and `outbox-relay inbox`: references, exit codes, parked commands."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import sessionmaker

from outbox.consumer import Outcome, Processor, RetryPolicy
from relay.cli import main
from tests.consumer.app import App, build
from tests.consumer.support import order_message

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def invoke(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=input)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("tests.consumer.app", "must look like 'package.module:handlers'"),
        ("no_such_module_xyz:handlers", "no module named 'no_such_module_xyz'"),
        ("tests.consumer.app:nothing", "has no attribute 'nothing'"),
        ("tests.consumer.app:build", "build() failed: TypeError"),
        ("tests.consumer.support:order_message", "order_message() failed"),
        ("tests.consumer.app:Faults", "is a Faults, not an outbox.consumer.Handlers"),
    ],
)
def test_a_bad_handlers_reference_is_a_clear_error_and_exit_2(
    reference: str, message: str, pg_url: str
) -> None:
    code, output = invoke("consume", reference, "--database-url", pg_url, "--amqp-url", AMQP)
    assert code == 2, output
    assert message in output


def test_missing_inbox_tables_exit_5_and_say_how_to_create_them(
    pg_url: str, schema_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_TEST_SCHEMA", schema_name)
    args = ["--database-url", pg_url]
    code, output = invoke("consume", "tests.consumer.app:handlers", *args, "--amqp-url", AMQP)
    assert code == 5, output
    assert "inbox tables missing" in output and "outbox-relay inbox init-db" in output
    code, output = invoke("inbox", "init-db", "tests.consumer.app:handlers", *args)
    assert code == 0, output
    assert f"{schema_name}.inbox_parked" in output
    code, output = invoke("inbox", "init-db", "tests.consumer.app:handlers", *args)
    assert code == 0, output  # idempotent


@pytest.fixture
def parked_app(pg_engine: sa.Engine, schema_name: str) -> tuple[App, list[str]]:
    """Key order:bad parked (head failed, one behind), a stale message, order:ok applied."""
    app = build(schema_name, name="grp")
    app.create(pg_engine)
    processor = Processor(
        app.handlers,
        sessionmaker(pg_engine),
        policy=RetryPolicy(max_attempts=1),
        sleep=lambda s: None,
    )
    app.faults.fail_times["bad"] = 1
    assert processor.process(order_message("bad", 1, seq=1)).outcome is Outcome.PARKED
    assert processor.process(order_message("bad", 2, seq=2)).outcome is Outcome.PARKED
    assert processor.process(order_message("ok", 2, seq=20)).outcome is Outcome.HANDLED
    assert processor.process(order_message("ok", 1, seq=10)).outcome is Outcome.STALE
    options = [
        "--database-url",
        str(pg_engine.url.render_as_string(False)),
        "--consumer",
        "grp",
        "--schema",
        schema_name,
    ]
    return app, options


def test_parked_list_shows_reasons_and_errors(parked_app: tuple[App, list[str]]) -> None:
    _, options = parked_app
    code, output = invoke("inbox", "parked", "list", *options)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split()[:6] == ["ID", "KEY", "SEQ", "TYPE", "V", "REASON"]
    assert "order:bad" in lines[1] and "failed" in lines[1] and "RuntimeError: booking" in lines[1]
    assert "behind" in lines[2]
    assert "order:ok" in lines[3] and "stale" in lines[3]
    assert "3 parked messages, 1 key held back" in output
    code, output = invoke("inbox", "parked", "list", "--json", "--key", "order:ok", *options)
    [row] = json.loads(output)
    assert (row["reason"], row["seq"]) == ("stale", 10)


def test_parked_show_prints_payload_headers_and_the_whole_error(
    parked_app: tuple[App, list[str]],
) -> None:
    _, options = parked_app
    code, output = invoke("inbox", "parked", "list", "--json", *options)
    first = json.loads(output)[0]["id"]
    code, output = invoke("inbox", "parked", "show", str(first), *options)
    assert code == 0, output
    assert '"order_id": "bad"' in output and "Traceback" in output and "ordering-key" in output
    code, output = invoke("inbox", "parked", "show", "999999", *options)
    assert code == 1 and "no parked message 999999" in output


def test_retry_needs_a_selection_asks_first_and_dry_runs(parked_app: tuple[App, list[str]]) -> None:
    _, options = parked_app
    assert invoke("inbox", "parked", "retry", *options)[0] == 2
    code, output = invoke("inbox", "parked", "retry", "order:nope", *options)
    assert code == 1 and "not parked" in output and "nothing was changed" in output
    code, output = invoke("inbox", "parked", "retry", "order:bad", "--dry-run", *options)
    assert code == 0 and "would retry 2 parked messages (1 key)" in output
    code, output = invoke("inbox", "parked", "retry", "order:bad", *options, input="n\n")
    assert code == 1 and "not confirmed" in output
    code, output = invoke("inbox", "parked", "list", "--json", *options)
    assert not any(row["retry_requested"] for row in json.loads(output))
    code, output = invoke("inbox", "parked", "retry", "order:bad", *options, input="y\n")
    assert code == 0 and "retry requested for 2 parked messages" in output
    code, output = invoke("inbox", "parked", "list", "--json", "--key", "order:bad", *options)
    assert all(row["retry_requested"] for row in json.loads(output))


def test_skip_drops_the_head_after_confirmation_and_the_key_flows_when_nothing_is_left(
    parked_app: tuple[App, list[str]], pg_engine: sa.Engine
) -> None:
    app, options = parked_app
    code, output = invoke("inbox", "parked", "skip", "order:bad", *options, input="n\n")
    assert code == 1 and "not confirmed" in output
    code, output = invoke("inbox", "parked", "skip", "order:bad", *options, input="y\n")
    assert code == 0, output
    assert "1 message of key 'order:bad' still parked" in output
    code, output = invoke("inbox", "parked", "skip", "order:bad", "--yes", *options)
    assert code == 0 and "still parked" not in output
    code, output = invoke("inbox", "parked", "skip", "order:bad", "--yes", *options)
    assert code == 1 and "is not parked" in output
    processor = Processor(app.handlers, sessionmaker(pg_engine))
    assert processor.process(order_message("bad", 3, seq=3)).outcome is Outcome.HANDLED
    assert [(o, n) for h, o, n in app.applied(pg_engine) if h == "book"] == [("ok", 2), ("bad", 3)]


def test_a_stale_message_is_retried_only_by_its_id_and_is_then_applied_late(
    parked_app: tuple[App, list[str]], pg_engine: sa.Engine
) -> None:
    app, options = parked_app
    code, output = invoke("inbox", "parked", "retry", "order:ok", *options)
    assert code == 1 and "not parked for consumer 'grp': key 'order:ok'" in output
    code, output = invoke("inbox", "parked", "retry", "--all", "--dry-run", *options)
    assert "would retry 2 parked messages (1 key)" in output  # not the stale one
    code, output = invoke("inbox", "parked", "list", "--json", "--key", "order:ok", *options)
    [stale] = json.loads(output)
    code, output = invoke("inbox", "parked", "retry", "--id", str(stale["id"]), *options)
    assert code == 0, output
    processor = Processor(app.handlers, sessionmaker(pg_engine))
    assert processor.retry_requested() == 1
    booked = [(o, n) for h, o, n in app.applied(pg_engine) if h == "book"]
    assert booked == [("ok", 2), ("ok", 1)]  # applied late, as asked


def test_every_json_line_of_consume_names_the_consumer_group(
    pg_url: str, schema_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    import relay.consumer.app

    monkeypatch.setenv("OUTBOX_TEST_SCHEMA", schema_name)
    monkeypatch.setenv("OUTBOX_TEST_GROUP", "billing")
    args = ["tests.consumer.app:handlers", "--database-url", pg_url]
    assert invoke("inbox", "init-db", *args)[0] == 0

    class Pool:  # the consumers themselves need a broker: here they only log a line
        def run(self) -> None:
            logging.getLogger("outbox.consumer").warning("a line from a consumer thread")

    monkeypatch.setattr(relay.consumer.app, "build_consumers", lambda *a, **k: Pool())
    result = CliRunner().invoke(
        main, ["--log-format", "json", "consume", *args, "--amqp-url", AMQP]
    )
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(e["message"] == "a line from a consumer thread" for e in entries), entries
    assert {e.get("consumer") for e in entries} == {"billing"}
