"""Every operator command through click's CliRunner, on a SQLite outbox (the same Core queries
run on PostgreSQL in tests/integration/test_admin.py)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import outbox
from outbox import Event, Outbox
from relay.admin import Admin
from relay.admin_records import Selector
from relay.cli import main
from relay.cli.exits import EXIT_CODES_HELP
from relay.cli.render import format_age
from relay.cli.run import option_error, run
from relay.cli.terminal import progress_bar
from relay.errors import ConfigError, NotFoundError


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` configures logging onto CliRunner's streams; put pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def db(sqlite_url: str) -> Iterator[tuple[str, sa.Engine, Outbox]]:
    engine = sa.create_engine(sqlite_url)
    box = Outbox()
    box.create(engine)
    yield sqlite_url, engine, box
    engine.dispose()


def cli(url: str | None, *args: str, input: str | None = None) -> Result:
    env = {"OUTBOX_DATABASE_URL": url} if url else {}
    return CliRunner(env=env).invoke(
        main, list(args), input=input, catch_exceptions=False, prog_name="outbox-relay"
    )


def seed(
    engine: sa.Engine,
    box: Outbox,
    events: Sequence[tuple[str, str | None, str]],
) -> list[uuid.UUID]:
    """Write (type, key, status) rows in order; dead ones get attempts and a failure each."""
    written = [
        Event(type=type_, key=key, payload={"n": n}) for n, (type_, key, _) in enumerate(events)
    ]
    t, f, k = box.events, box.failures, box.keys
    with engine.begin() as conn:
        outbox.write(conn, *written, outbox=box)
        for event, (_, key, status) in zip(written, events, strict=True):
            if status == "dead":
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == event.id)
                    .values(status="dead", attempts=2, last_error="unroutable: 312 NO_ROUTE")
                )
                conn.execute(sa.update(k).where(k.c.key == key).values(held=True))
                conn.execute(
                    sa.insert(f),
                    [
                        {
                            "event_id": event.id,
                            "attempt": attempt,
                            "failed_at": now() - dt.timedelta(minutes=3 - attempt),
                            "relay": "r1",
                            "error": "unroutable: 312 NO_ROUTE",
                        }
                        for attempt in (1, 2)
                    ],
                )
            elif status == "published":
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == event.id)
                    .values(status="published", published_at=now() - dt.timedelta(days=2))
                )
            elif status == "retry":
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == event.id)
                    .values(attempts=1, next_attempt_at=now() + dt.timedelta(minutes=5))
                )
                conn.execute(
                    sa.update(k)
                    .where(k.c.key == key)
                    .values(available_at=now() + dt.timedelta(minutes=5))
                )
            elif status == "leased":
                conn.execute(
                    sa.update(k)
                    .where(k.c.key == key)
                    .values(
                        lease_token=uuid.uuid4(),
                        leased_by="r1",
                        available_at=now() + dt.timedelta(minutes=5),
                    )
                )
    return [event.id for event in written]


def rows(engine: sa.Engine, box: Outbox) -> dict[uuid.UUID, dict[str, object]]:
    t = box.events
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(t).order_by(t.c.seq)).mappings()}


def failure_count(engine: sa.Engine, box: Outbox) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(box.failures)).scalar_one())


# -- help and options -------------------------------------------------------------------------


def test_help_teaches_the_commands_and_the_exit_codes() -> None:
    result = cli(None, "--help")
    assert result.exit_code == 0
    for command in ("run", "init-db", "status", "dead", "purge", "health", "demo"):
        assert f"  {command} " in result.output
    text = " ".join(result.output.split())
    assert "3 database unreachable" in text and "5 outbox tables missing" in text
    dead_help = cli(None, "dead", "requeue", "--help").output
    assert "--dry-run" in dead_help and "--yes" in dead_help and "all or" in dead_help


def test_every_run_option_can_come_from_an_outbox_variable() -> None:
    options = [p for p in run.params if isinstance(p, click.Option) and p.name != "help"]
    assert {"metrics_port", "metrics_address"} <= {p.name for p in options}
    for option in options:
        assert isinstance(option.envvar, str) and option.envvar.startswith("OUTBOX_"), option.name
        assert option.show_envvar, option.name
    assert "OUTBOX_METRICS_PORT" in cli(None, "run", "--help").output


def test_json_outputs_are_documented_in_help() -> None:
    for command in (["status"], ["dead", "list"], ["dead", "show"], ["health"]):
        assert "--json prints" in cli(None, *command, "--help").output, command


def test_a_settings_error_names_the_option_that_sets_it() -> None:
    error = option_error(ConfigError("retry_min (5.0s) must not exceed retry_max (1.0s)"))
    assert str(error) == "--retry-min (5.0s) must not exceed --retry-max (1.0s)"
    assert str(option_error(ConfigError("something else"))) == "something else"


def test_bad_option_values_say_which_and_why(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, _, _ = db
    result = cli(url, "run", "--amqp-url", "amqp://x", "--retry-min", "5s", "--retry-max", "1s")
    assert result.exit_code == 2
    assert "--retry-min (5.0s) must not exceed --retry-max (1.0s)" in result.stderr
    result = cli(url, "purge", "--older-than", "soon")
    assert result.exit_code == 2 and "--older-than" in result.stderr
    result = cli(url, "dead", "list", "--since", "yesterday")
    assert result.exit_code == 2 and "neither a duration" in result.stderr
    result = cli(url, "dead", "show", "not-a-uuid")
    assert result.exit_code == 2 and "is not an event id" in result.stderr
    result = cli(url, "status", "--table", "bad name")
    assert result.exit_code == 2 and "not a plain SQL identifier" in result.stderr


COMMANDS_WITH_A_DATABASE = [
    ["run"],
    ["health"],
    ["status"],
    ["init-db"],
    ["purge", "--older-than", "1d"],
    ["dead", "list"],
    ["dead", "show", str(uuid.UUID(int=1))],
    ["dead", "requeue", "--all"],
    ["dead", "purge", "--all"],
]
NEEDS_A_BROKER = (["run"], ["health"])
NO_OUTBOX_ENV = {name: None for name in ("OUTBOX_DATABASE_URL", "OUTBOX_AMQP_URL")}


def invoke(args: Sequence[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner(env={**NO_OUTBOX_ENV, **(env or {})}).invoke(
        main, list(args), catch_exceptions=False, prog_name="outbox-relay"
    )


@pytest.mark.parametrize("command", COMMANDS_WITH_A_DATABASE)
def test_required_options_are_required_also_when_their_variable_is_empty(
    command: list[str], sqlite_url: str
) -> None:
    for env in ({}, {"OUTBOX_DATABASE_URL": ""}):
        result = invoke(command, {**env, "OUTBOX_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
        assert result.exit_code == 2, result.output
        assert "Missing option '--database-url'" in result.stderr
    if command in NEEDS_A_BROKER:
        for env in ({}, {"OUTBOX_AMQP_URL": ""}):
            result = invoke(command, {**env, "OUTBOX_DATABASE_URL": sqlite_url})
            assert result.exit_code == 2, result.output
            assert "Missing option '--amqp-url'" in result.stderr


@pytest.mark.parametrize("command", COMMANDS_WITH_A_DATABASE)
@pytest.mark.parametrize(
    "url",
    ["mysql://root@db/app", "postgresql+psycopg2://db/app", "postgresql+asyncpg://db/app", "x y"],
)
def test_one_database_url_check_for_every_command(command: list[str], url: str) -> None:
    broker = ["--amqp-url", "amqp://g:g@127.0.0.1:1/"] if command in NEEDS_A_BROKER else []
    result = invoke([*command, "--database-url", url, *broker])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "--database-url" in text and "postgresql+psycopg://" in text and "sqlite:///" in text
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", NEEDS_A_BROKER)
@pytest.mark.parametrize("password", ["se#cret", "se?cret", "se/cret", "s#e?c/ret"])
def test_a_broker_password_with_url_characters_is_refused_without_showing_it(
    command: list[str], password: str, sqlite_url: str
) -> None:
    url = f"amqp://guest:{password}@127.0.0.1:1/%2F"
    result = invoke([*command, "--database-url", sqlite_url, "--amqp-url", url])
    assert result.exit_code == 2, result.output
    assert "percent-encode" in result.stderr
    assert "cret" not in result.output


@pytest.mark.parametrize("command", [["run"], ["status"], ["health"]])
def test_an_encoded_password_is_never_shown_in_errors(command: list[str]) -> None:
    database = "postgresql://root:p%40ss%2Fw%23rd@127.0.0.1:1/app"
    amqp = "amqp://guest:p%23ss@127.0.0.1:1/%2F,amqp://bob:bob%3Fsecret@127.0.0.1:1/%2F"
    broker = ["--amqp-url", amqp] if command in NEEDS_A_BROKER else []
    result = invoke([*command, "--database-url", database, *broker])
    assert result.exit_code == 3, result.output
    assert "root:***@127.0.0.1:1/app" in result.stderr + result.stdout
    for secret in ("p%40ss", "w%23rd", "p%23ss", "secret", "ss%2F"):
        assert secret not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--log-format", "json", "--log-level", "DEBUG", "status"],
        ["status", "--log-format", "json", "--log-level", "DEBUG"],
        ["--log-format", "text", "status", "--log-format", "json", "--log-level", "debug"],
    ],
)
def test_logging_options_work_before_and_after_the_command(
    args: list[str], db: tuple[str, sa.Engine, Outbox]
) -> None:
    url, _, _ = db
    result = invoke(args, {"OUTBOX_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, "to amqp://u:pw@h/", (), None)
    assert json.loads(root.handlers[0].format(record))["message"] == "to amqp://u:***@h/"
    assert "--log-format" in invoke(["run", "--help"]).output
    assert "--log-format" in invoke(["dead", "list", "--help"]).output


def test_every_command_takes_the_logging_options() -> None:
    def walk(command: click.Command) -> Iterator[click.Command]:
        yield command
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                yield from walk(sub)

    later = click.Command("later", callback=lambda: None)
    main.add_command(later)  # a command registered after start-up gets them too
    try:
        for command in walk(main):
            names = [p.name for p in command.params]
            assert names.count("log_level") == names.count("log_format") == 1, command.name
    finally:
        main.commands.pop("later")


def test_version() -> None:
    from importlib.metadata import version

    result = invoke(["--version"])
    assert result.exit_code == 0 and version("outbox-relay") in result.output


# -- database errors ---------------------------------------------------------------------------


def test_unreachable_database_names_the_masked_url_and_its_variable() -> None:
    result = cli("postgresql://root:s3cret@127.0.0.1:1/app", "status")
    assert result.exit_code == 3
    assert "postgresql://root:***@127.0.0.1:1/app" in result.stderr
    assert "OUTBOX_DATABASE_URL" in result.stderr
    assert "s3cret" not in result.output


def test_missing_tables_exit_5_and_say_what_to_run(sqlite_url: str) -> None:
    result = cli(sqlite_url, "status")
    assert result.exit_code == 5
    assert "outbox-relay init-db" in result.stderr


def test_init_db_is_idempotent_and_prints_ddl(sqlite_url: str) -> None:
    assert cli(sqlite_url, "init-db").exit_code == 0
    second = cli(sqlite_url, "init-db")
    assert second.exit_code == 0 and "outbox tables ready" in second.output
    ddl = cli(sqlite_url, "init-db", "--sql")
    assert "CREATE TABLE IF NOT EXISTS outbox" in ddl.output


# -- status ------------------------------------------------------------------------------------


def test_status_counts_every_state(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    seed(
        engine,
        box,
        [
            ("order.placed", "a", "dead"),
            ("order.paid", "a", "pending"),  # held back by the dead row
            ("order.placed", "b", "retry"),
            ("order.paid", "b", "pending"),  # held back by the retrying row
            ("order.placed", "c", "leased"),
            ("order.placed", "d", "published"),
            ("order.placed", None, "pending"),
        ],
    )
    with engine.begin() as conn:
        conn.execute(
            sa.insert(box.relays),
            [
                {
                    "name": "fresh",
                    "host": "h",
                    "pid": 1,
                    "started_at": now(),
                    "heartbeat_at": now(),
                },
                {
                    "name": "stale",
                    "host": "h",
                    "pid": 2,
                    "started_at": now(),
                    "heartbeat_at": now() - dt.timedelta(minutes=5),
                },
            ],
        )
    result = cli(url, "status", "--json")
    assert result.exit_code == 0
    status = json.loads(result.output)
    assert {k: status[k] for k in ("pending", "in_flight", "waiting_retry", "dead")} == {
        "pending": 5,
        "in_flight": 1,
        "waiting_retry": 1,
        "dead": 1,
    }
    assert status["published"] == 1
    assert status["keys_held_back"] == 2
    assert status["oldest_pending_age_seconds"] >= 0
    assert [r["name"] for r in status["active_relays"]] == ["fresh"]

    table = cli(url, "status").output
    assert re.search(r"keys held back\s+2\b", table)
    assert re.search(r"dead\s+1\s+see `outbox-relay dead list`", table)
    assert "fresh" in table and "stale" not in table


def test_status_fail_on_dead_exits_8_only_with_dead_letters(
    db: tuple[str, sa.Engine, Outbox],
) -> None:
    url, engine, box = db
    seed(engine, box, [("a", "k", "pending")])
    assert cli(url, "status", "--fail-on-dead").exit_code == 0
    assert cli(url, "status").exit_code == 0
    seed(engine, box, [("b", "j", "dead"), ("c", "j", "dead")])
    assert cli(url, "status").exit_code == 0  # without the option: informational only
    result = cli(url, "status", "--fail-on-dead")
    assert result.exit_code == 8
    assert "2 dead letters: see `outbox-relay dead list`" in result.stderr
    assert re.search(r"dead\s+2", result.stdout)  # the status itself is printed first
    as_json = cli(url, "status", "--json", "--fail-on-dead")
    assert as_json.exit_code == 8 and json.loads(as_json.stdout)["dead"] == 2


# -- dead list / show --------------------------------------------------------------------------


def test_dead_list_filters_in_write_order(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    ids = seed(
        engine,
        box,
        [
            ("invoice.created", "i1", "dead"),
            ("order.placed", "o1", "dead"),
            ("invoice.created", "i2", "dead"),
            ("invoice.created", "i3", "pending"),
        ],
    )
    listed = json.loads(cli(url, "dead", "list", "--json").output)
    assert [d["id"] for d in listed] == [str(ids[0]), str(ids[1]), str(ids[2])]
    assert listed[0]["attempts"] == 2 and "NO_ROUTE" in listed[0]["last_error"]
    assert listed[0]["last_failed_at"] is not None

    by_type = json.loads(cli(url, "dead", "list", "--json", "--type", "invoice.created").output)
    assert [d["id"] for d in by_type] == [str(ids[0]), str(ids[2])]
    by_key = json.loads(cli(url, "dead", "list", "--json", "--key", "o1").output)
    assert [d["id"] for d in by_key] == [str(ids[1])]
    assert json.loads(cli(url, "dead", "list", "--json", "--since", "1m").output) == []
    assert len(json.loads(cli(url, "dead", "list", "--json", "--since", "1h").output)) == 3
    since = (now() - dt.timedelta(hours=1)).isoformat()
    assert len(json.loads(cli(url, "dead", "list", "--json", "--since", since).output)) == 3

    table = cli(url, "dead", "list", "--limit", "2")
    assert table.exit_code == 0
    assert "LAST ERROR" in table.output and str(ids[1]) in table.output
    assert "showing 2 of 3 dead letters" in table.output


def test_dead_list_says_when_there_are_none(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, _, _ = db
    assert cli(url, "dead", "list").output.strip() == "no dead letters"
    assert json.loads(cli(url, "dead", "list", "--json").output) == []


def test_dead_show_has_payload_headers_and_history(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    (dead_id,) = seed(engine, box, [("invoice.created", "i1", "dead")])
    shown = json.loads(cli(url, "dead", "show", str(dead_id), "--json").output)
    assert shown["id"] == str(dead_id) and shown["status"] == "dead"
    assert shown["payload"] == {"n": 0} and shown["headers"] == {}
    assert [f["attempt"] for f in shown["failures"]] == [1, 2]
    assert "claim_token" not in shown
    table = cli(url, "dead", "show", str(dead_id)).output
    assert "payload:" in table and '"n": 0' in table and "failures (2, oldest first)" in table


def test_dead_show_of_an_unknown_id_exits_1(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, _, _ = db
    missing = uuid.uuid4()
    result = cli(url, "dead", "show", str(missing))
    assert result.exit_code == 1 and f"event {missing} does not exist" in result.stderr


# -- dead requeue ------------------------------------------------------------------------------


def test_requeue_one_id_resets_it_and_keeps_id_and_seq(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    dead_id, _later = seed(engine, box, [("invoice.created", "i1", "dead"), ("x", "i1", "pending")])
    before = rows(engine, box)[dead_id]
    result = cli(url, "dead", "requeue", str(dead_id))  # one row: no question
    assert result.exit_code == 0, result.output
    assert "requeued 1 dead letter (1 key)" in result.output
    after = rows(engine, box)[dead_id]
    assert after["status"] == "pending" and after["attempts"] == 0
    assert after["next_attempt_at"] is None and after["lease_until"] is None
    assert after["claim_token"] is None and after["seq"] == before["seq"]
    assert failure_count(engine, box) == 2  # the history stays


def test_requeue_of_a_missing_or_live_id_changes_nothing(
    db: tuple[str, sa.Engine, Outbox],
) -> None:
    url, engine, box = db
    dead_id, pending_id = seed(engine, box, [("a", "k", "dead"), ("b", "k", "pending")])
    missing = uuid.uuid4()
    result = cli(url, "dead", "requeue", "--yes", str(dead_id), str(missing), str(pending_id))
    assert result.exit_code == 1
    assert f"event {missing} does not exist" in result.stderr
    assert f"event {pending_id} is pending, not dead" in result.stderr
    assert "nothing was changed" in result.stderr
    assert rows(engine, box)[dead_id]["status"] == "dead"


def test_requeue_of_several_asks_first(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    ids = seed(engine, box, [("a", "k1", "dead"), ("a", "k2", "dead")])
    refused = cli(url, "dead", "requeue", "--all", input="n\n")
    assert refused.exit_code == 1 and "not confirmed" in refused.stderr
    assert "Requeue 2 dead letters (2 keys)?" in refused.stderr
    no_terminal = cli(url, "dead", "requeue", "--all", input="")
    assert no_terminal.exit_code == 1
    assert {rows(engine, box)[i]["status"] for i in ids} == {"dead"}

    accepted = cli(url, "dead", "requeue", "--all", input="y\n")
    assert accepted.exit_code == 0 and "requeued 2 dead letters (2 keys)" in accepted.output
    assert {rows(engine, box)[i]["status"] for i in ids} == {"pending"}


def test_requeue_by_selection_and_dry_run(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    ids = seed(
        engine,
        box,
        [("invoice.created", "i1", "dead"), ("order.placed", "o1", "dead"), ("x", "o1", "dead")],
    )
    dry = cli(url, "dead", "requeue", "--key", "o1", "--dry-run")
    assert dry.exit_code == 0
    assert (
        "would requeue 2 dead letters (1 key)" in dry.output and "nothing was changed" in dry.output
    )
    assert {r["status"] for r in rows(engine, box).values()} == {"dead"}

    done = cli(url, "dead", "requeue", "--type", "order.placed", "--key", "o1", "--yes")
    assert done.exit_code == 0 and "requeued 1 dead letter" in done.output
    assert [rows(engine, box)[i]["status"] for i in ids] == ["dead", "pending", "dead"]

    nothing = cli(url, "dead", "requeue", "--type", "nope", "--yes")
    assert nothing.exit_code == 0 and "no dead letters match" in nothing.output


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--all", "--type", "x"],
        [str(uuid.UUID(int=1)), "--all"],
        [str(uuid.UUID(int=1)), "--key", "k"],
    ],
)
def test_requeue_selectors_are_checked(db: tuple[str, sa.Engine, Outbox], args: list[str]) -> None:
    url, _, _ = db
    result = cli(url, "dead", "requeue", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error:")


def test_requeue_works_in_batches_and_stops_at_what_was_planned(
    db: tuple[str, sa.Engine, Outbox],
) -> None:
    _, engine, box = db
    ids = seed(engine, box, [("a", f"k{i % 3}", "dead") for i in range(10)])
    admin = Admin(engine, box, batch_size=3)
    plan = admin.plan(Selector(everything=True))
    assert (plan.count, plan.keys) == (10, 3)
    (late,) = seed(engine, box, [("a", "k0", "dead")])  # dies after the plan
    progress: list[int] = []
    assert admin.requeue(plan, progress.append) == 10
    assert progress == [3, 3, 3, 1]
    state = rows(engine, box)
    assert {state[i]["status"] for i in ids} == {"pending"}
    assert state[late]["status"] == "dead"


def test_admin_requeue_rechecks_named_ids(db: tuple[str, sa.Engine, Outbox]) -> None:
    _, engine, box = db
    a, b = seed(engine, box, [("a", "k", "dead"), ("a", "k", "dead")])
    admin = Admin(engine, box)
    plan = admin.plan(Selector(ids=(a, b)))
    with engine.begin() as conn:  # someone purged b meanwhile
        conn.execute(sa.delete(box.events).where(box.events.c.id == b))
    with pytest.raises(NotFoundError, match="does not exist"):
        admin.requeue(plan)
    assert rows(engine, box)[a]["status"] == "dead"


# -- dead purge and purge ----------------------------------------------------------------------


def test_dead_purge_deletes_rows_and_history_after_confirmation(
    db: tuple[str, sa.Engine, Outbox],
) -> None:
    url, engine, box = db
    dead_id, other, live = seed(
        engine, box, [("a", "k", "dead"), ("b", "j", "dead"), ("c", "k", "pending")]
    )
    refused = cli(url, "dead", "purge", str(dead_id), str(other), input="n\n")  # several: asks
    assert refused.exit_code == 1 and "Delete 2 dead letters" in refused.stderr
    assert {dead_id, other} <= set(rows(engine, box))
    done = cli(url, "dead", "purge", str(dead_id), input="")  # one row: no question
    assert done.exit_code == 0 and "deleted 1 dead letter" in done.output
    assert "Delete" not in done.output
    assert set(rows(engine, box)) == {other, live}
    assert failure_count(engine, box) == 2  # other's history is kept
    not_dead = cli(url, "dead", "purge", str(live), "--yes")
    assert not_dead.exit_code == 1 and live in rows(engine, box)


def test_purge_removes_only_old_published_rows(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, engine, box = db
    old, pending, dead = seed(
        engine, box, [("a", "k", "published"), ("b", "k", "pending"), ("c", "j", "dead")]
    )
    assert (
        "would delete 1 published event"
        in cli(url, "purge", "--older-than", "1d", "--dry-run").output
    )
    assert old in rows(engine, box)
    kept = cli(url, "purge", "--older-than", "3d")
    assert kept.exit_code == 0 and "deleted 0 published events" in kept.output
    done = cli(url, "purge", "--older-than", "1d")
    assert done.exit_code == 0 and "deleted 1 published event" in done.output
    assert set(rows(engine, box)) == {pending, dead}


# -- health ------------------------------------------------------------------------------------


def test_health_reports_each_service_on_one_line(db: tuple[str, sa.Engine, Outbox]) -> None:
    url, _, _ = db
    result = cli(url, "health", "--amqp-url", "amqp://guest:pw@127.0.0.1:1/%2F")
    assert result.exit_code == 4
    lines = result.output.splitlines()
    assert lines[0].startswith("database  ok")
    assert lines[1].startswith("broker    FAIL") and "OUTBOX_AMQP_URL" in lines[1]
    assert "pw@" not in result.output
    as_json = cli(url, "health", "--amqp-url", "amqp://guest:pw@127.0.0.1:1/%2F", "--json")
    assert json.loads(as_json.output)["ok"] is False


def test_health_names_the_database_first(tmp_path: Path) -> None:
    result = cli(
        f"sqlite:///{tmp_path}/empty.db", "health", "--amqp-url", "amqp://g:g@127.0.0.1:1/"
    )
    assert result.exit_code == 5
    assert "init-db" in result.output


def test_exit_codes_are_in_every_help() -> None:
    for command in (["run"], ["status"], ["dead", "requeue"], ["purge"], ["health"], ["demo"]):
        text = "".join(cli(None, *command, "--help").output.split())
        assert "".join(EXIT_CODES_HELP.split()) in text, command


def test_demo_uses_a_database_of_its_own_not_outbox_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay.cli.demo import demo
    from relay.demo import DEFAULT_DATABASE_URL

    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://root@127.0.0.1/production")
    assert demo.make_context("demo", []).params["database_url"] == DEFAULT_DATABASE_URL
    assert DEFAULT_DATABASE_URL.endswith("/outbox_demo")
    monkeypatch.setenv("OUTBOX_DEMO_DATABASE_URL", "postgresql://root@127.0.0.1/mine")
    assert demo.make_context("demo", []).params["database_url"].endswith("/mine")


def test_demo_needs_postgresql(sqlite_url: str) -> None:
    result = cli(None, "demo", "--database-url", sqlite_url)
    assert result.exit_code == 2 and "the demo needs PostgreSQL" in result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_repairs_show_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(5000, "requeueing", batch=1000) as update:
        assert update is not None
        for _ in range(5):
            update(1000)
    assert "requeueing" in terminal.getvalue()
    with progress_bar(500, "requeueing", batch=1000) as small:
        assert small is None  # one batch: nothing to watch
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(5000, "requeueing", batch=1000) as piped:
        assert piped is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (3.21, "3.2s"), (125, "2m 05s"), (3 * 3600 + 60, "3h 01m"), (90000, "1d 1h")],
)
def test_ages_read_like_a_person_would_say_them(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


def test_run_stopped_while_starting_exits_0_without_starting(
    db: tuple[str, sa.Engine, Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM during start-up (here: while the relay is being built) is handled like any
    # other: exit 0, nothing claimed, the process's own handler restored afterwards.
    import os
    import signal

    import relay.app

    url, _, _ = db
    real_build = relay.app.build_relay
    built = []

    def build_and_get_stopped(*args: object, **kwargs: object) -> object:
        built.append(real_build(*args, **kwargs))  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)
        return built[-1]

    def outside(signum: int, frame: object) -> None:
        raise AssertionError("SIGTERM during start-up came before run installed its handler")

    monkeypatch.setattr(relay.app, "build_relay", build_and_get_stopped)
    before = signal.signal(signal.SIGTERM, outside)
    try:
        result = cli(url, "run", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
        assert signal.getsignal(signal.SIGTERM) is outside  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 0, result.output
    assert "stopped before it started" in result.stderr
    assert built and not built[0].publisher.ready  # never connected, never claimed


def test_every_json_line_of_run_names_the_relay(
    db: tuple[str, sa.Engine, Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    import relay.app

    url, _, _ = db
    real_build = relay.app.build_relay

    def build_and_get_stopped(*args: object, **kwargs: object) -> object:
        built = real_build(*args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)
        return built

    monkeypatch.setattr(relay.app, "build_relay", build_and_get_stopped)
    result = cli(
        url,
        *("--log-format", "json", "run", "--name", "relay-7"),
        *("--amqp-url", "amqp://guest:guest@127.0.0.1:1/"),
    )
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("stopped before it started" in e["message"] for e in entries), entries
    assert {e.get("relay") for e in entries} == {"relay-7"}


# -- SQLite: one relay at a time ---------------------------------------------------------------


def test_a_second_relay_on_the_same_sqlite_database_exits_7(
    db: tuple[str, sa.Engine, Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.app
    from relay.sqlite_lock import single_relay

    url, _, _ = db

    def never(*args: object, **kwargs: object) -> object:
        raise AssertionError("a second relay must not even be built")

    monkeypatch.setattr(relay.app, "build_relay", never)
    with single_relay(url):
        result = cli(url, "run", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    assert result.exit_code == 7, result.output
    assert f"another relay (pid {os.getpid()}) is running on the SQLite database" in result.stderr
    assert "one relay at a time" in result.stderr


def test_run_holds_the_sqlite_lock_until_it_stops(
    db: tuple[str, sa.Engine, Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import relay.app
    from relay.sqlite_lock import DatabaseLockedError, single_relay

    url, _, _ = db
    real_build = relay.app.build_relay
    while_running: list[BaseException] = []

    def build(*args: object, **kwargs: object) -> object:
        try:
            with single_relay(url):
                pass
        except DatabaseLockedError as exc:
            while_running.append(exc)
        os.kill(os.getpid(), signal.SIGTERM)  # stop it before it connects anywhere
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(relay.app, "build_relay", build)
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = cli(url, "run", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 0, result.output
    assert len(while_running) == 1  # held while the relay ran...
    with single_relay(url) as path:  # ...and released when it stopped
        assert path is not None and path.name == "outbox.db.relay-lock"


def test_the_sqlite_lock_of_a_killed_relay_is_released(sqlite_url: str) -> None:
    import signal
    import subprocess
    import time

    from relay.sqlite_lock import DatabaseLockedError, lock_path, single_relay

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from relay.sqlite_lock import single_relay\n"
            "with single_relay(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            sqlite_url,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(DatabaseLockedError, match=f"pid {holder.pid}"),
            single_relay(sqlite_url),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            with single_relay(sqlite_url):
                break
        except DatabaseLockedError:
            assert time.monotonic() < deadline, "the killed relay's lock was never released"
            time.sleep(0.05)
    assert lock_path("postgresql://db/app") is None
    assert lock_path("sqlite:///:memory:") is None
