"""A claim that writes the confirms it carries after it (`Store.claim_then_write`): the claim
in a transaction of its own, answered as soon as it commits, then the write, in the same
round trip.

Each test checks one assumption of the method's docstring: the answer comes while the write
still runs (held here by a row lock another connection keeps), the claim cannot take a key
the write frees and the write says the key has events left, a failing claim answers nothing
and writes nothing, a failing write leaves the claim committed and the session usable, the
prepared read lost from the session is prepared again, and a role that may not run a DO
block gets the write first instead.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.records import Claim
from relay.store import Carried, FreedKeys, Store, Written
from tests.integration.test_store_claim import claim, now
from tests.integration.test_store_write_and_claim import confirms, key_leases, statuses
from tests.support.relays import write_events


def claim_then_write_parts(
    store: Store, carried: Carried, *, run_length: int = 10
) -> tuple[Written, list[Claim], Claim | None]:
    """The write, the claims `answer` was given, and the claim it returned (when written
    first, where the notice cannot be raised)."""
    answers: list[Claim] = []
    moment = now()
    written, returned = store.claim_then_write(
        carried,
        answer=answers.append,
        owner="r",
        limit=100,
        run_length=run_length,
        lease_until=moment + dt.timedelta(seconds=30),
        now=moment,
    )
    return written, answers, returned


def claim_then_write(
    store: Store, carried: Carried, *, run_length: int = 10
) -> tuple[Written, list[Claim]]:
    """The write, and the claim, whichever way it came (one, unless the claim failed): never
    both ways."""
    written, answers, returned = claim_then_write_parts(store, carried, run_length=run_length)
    assert not (answers and returned is not None), "the claim both answered and returned"
    return written, answers if returned is None else [returned]


@pytest.fixture
def session(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, beside the store's."""
    dsn = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        yield conn


@pytest.mark.parametrize("client_min_messages", ["notice", "warning"])
def test_the_claims_answer_arrives_while_its_write_still_waits(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    session: psycopg.Connection[Any],
    client_min_messages: str,
) -> None:
    """Another connection holds a lock on the row the write marks: the write waits for it,
    and the claim's answer must come all the same. Released only once the answer came (or 5
    s on): with the answer sent at the query's end, it would come only after the release.
    Also where the role's settings keep notices from the client."""
    options = f"-c client_min_messages={client_min_messages}"
    engine = sa.create_engine(pg_engine.url, connect_args={"options": options})
    store = Store(engine, outbox_schema, db_timeout=30)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="a")])
    first = claim(store)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="b")])
    table = f'"{outbox_schema.schema}"."{outbox_schema.events.name}"'
    session.execute(f"SELECT 1 FROM {table} WHERE seq = %s FOR UPDATE", [first.events[0].seq])
    answered = threading.Event()
    released: dict[str, bool] = {}

    def release_later() -> None:
        released["after the answer"] = answered.wait(5)
        session.commit()

    releaser = threading.Thread(target=release_later)
    answers: list[Claim] = []

    def answer(got: Claim) -> None:
        answers.append(got)
        answered.set()

    releaser.start()
    try:
        moment = now()
        written, returned = store.claim_then_write(
            confirms(first),
            answer=answer,
            owner="r",
            limit=100,
            run_length=10,
            lease_until=moment + dt.timedelta(seconds=30),
            now=moment,
        )
    finally:
        answered.set()
        releaser.join()
        engine.dispose()
    assert released == {"after the answer": True}, "the answer waited for the write"
    assert returned is None
    (second,) = answers
    assert [e.key for e in second.events] == ["b"]
    assert written.owned == 1 and written.freed == FreedKeys(1, 0)
    assert statuses(pg_engine, outbox_schema)[first.events[0].seq] == "published"
    assert key_leases(pg_engine, outbox_schema) == {"b": second.token}


def test_a_key_the_write_frees_is_left_to_the_next_claim_and_said_to_have_events(
    setup: tuple[Store, sa.Engine, Outbox],
) -> None:
    """The claim runs before the write: a is still leased to the first claim then, so the
    claim takes none of a's rows; the write frees a and says it has rows left (kept), which
    is what makes the relay claim again."""
    store, engine, box = setup
    write_events(engine, box, [Event(type="t", key="a") for _ in range(2)])
    first = claim(store, run_length=1)
    written, (second,) = claim_then_write(store, confirms(first), run_length=1)
    assert second.events == ()
    assert written.owned == 1 and written.freed.ended == 1 and written.freed.kept == 1
    assert key_leases(engine, box) == {"a": None}
    third = claim(store, run_length=1)
    assert [e.key for e in third.events] == ["a"]
    assert third.events[0].seq != first.events[0].seq


def test_a_failing_claim_answers_nothing_and_writes_nothing(
    pg_engine: sa.Engine, outbox_schema: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="a")])
    first = claim(store)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="b")])
    before = statuses(pg_engine, outbox_schema), key_leases(pg_engine, outbox_schema)
    real = store._claim_script
    monkeypatch.setattr(store, "_claim_script", lambda read: [*real(read), ("boom", "SELECT 1/0")])
    with pytest.raises(Exception, match="division by zero"):
        claim_then_write(store, confirms(first))
    assert (statuses(pg_engine, outbox_schema), key_leases(pg_engine, outbox_schema)) == before
    monkeypatch.undo()
    written, (second,) = claim_then_write(store, confirms(first))
    assert written.owned == 1 and [e.key for e in second.events] == ["b"]


def test_a_write_failing_after_the_claim_is_raised_and_the_claim_stays(
    pg_engine: sa.Engine, outbox_schema: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim committed and answered: its lease holds. The write is rolled back (a is
    still pending and leased to the first claim), the error is raised, and the session is
    usable again (an aborted transaction left on it would fail every later query)."""
    engine = sa.create_engine(pg_engine.url, pool_size=1, max_overflow=0)
    store = Store(engine, outbox_schema, db_timeout=10)
    try:
        write_events(engine, outbox_schema, [Event(type="t", key="a")])
        first = claim(store)
        write_events(engine, outbox_schema, [Event(type="t", key="b")])
        real = store._write_steps

        def failing_write(*args: Any) -> Any:
            steps, values = real(*args)
            return [*steps, ("boom", "SELECT 1/0")], values

        monkeypatch.setattr(store, "_write_steps", failing_write)
        answers: list[Claim] = []
        moment = now()
        with pytest.raises(Exception, match="division by zero"):
            store.claim_then_write(
                confirms(first),
                answer=answers.append,
                owner="r",
                limit=100,
                run_length=10,
                lease_until=moment + dt.timedelta(seconds=30),
                now=moment,
            )
        (second,) = answers
        assert [e.key for e in second.events] == ["b"]
        assert key_leases(engine, outbox_schema) == {"a": first.token, "b": second.token}
        assert set(statuses(engine, outbox_schema).values()) == {"pending"}
        monkeypatch.undo()
        assert store.mark_and_end_runs(
            {first.token: [first.events[0].seq]}, {first.token: ["a"]}, now=now(), delete=False
        ) == Written(1, FreedKeys(1, 0))
    finally:
        engine.dispose()


def test_a_session_that_lost_the_prepared_read_claims_then_writes_all_the_same(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """The claim's transaction is explicit here: a read missing from the session aborts it,
    and it must be rolled back before the read is prepared again and the script resent."""
    engine = sa.create_engine(pg_engine.url, pool_size=1, max_overflow=0)
    store = Store(engine, outbox_schema, db_timeout=10)
    try:
        write_events(engine, outbox_schema, [Event(type="t", key="a")])
        first = claim(store)  # prepares the read on the one session
        write_events(engine, outbox_schema, [Event(type="t", key="b")])
        with engine.connect() as conn:
            conn.exec_driver_sql("DEALLOCATE ALL")
        written, (second,) = claim_then_write(store, confirms(first))
        assert written.owned == 1 and [e.key for e in second.events] == ["b"]
    finally:
        engine.dispose()


def test_on_postgresql_the_claim_and_the_write_after_it_are_one_round_trip(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "ab"])
    first = claim(store, run_length=1)
    claim_then_write(store, confirms(first))  # the role's check of DO blocks, once
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "cd"])
    third = claim(store)
    sent: list[str] = []
    store.statement_observers.append(lambda conn, statement: sent.append(statement))
    written, (fourth,) = claim_then_write(store, confirms(third))
    assert written.owned == 2 and fourth.events == ()
    assert len(sent) == 1


def test_a_role_that_may_not_run_a_do_block_gets_the_write_first(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """USAGE on plpgsql revoked: the notice cannot be raised, and the claim writes first
    (`write_and_claim`): the claim comes back with the write, not early, so that the relay
    subtracts the key it took again, as after `write_and_claim`; said once in the log."""
    import relay.store

    refused = "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege'; END$$"
    answer_now = (*relay.store.ANSWER_NOW[:-1], ("answer now", refused))
    monkeypatch.setattr(relay.store, "ANSWER_NOW", answer_now)
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="a") for _ in range(2)])
    first = claim(store, run_length=1)
    written, answers, second = claim_then_write_parts(store, confirms(first), run_length=1)
    assert answers == [] and second is not None, "returned with the write, not answered"
    assert [e.key for e in second.events] == ["a"], "written first, the claim took a again"
    assert written.freed == FreedKeys(1, 1)  # as `write_and_claim` says it: a had events
    assert "cannot run a DO block" in caplog.text


def test_a_do_block_refused_after_the_check_writes_alone_and_claims_write_first_from_then_on(
    pg_engine: sa.Engine,
    outbox_schema: Outbox,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """USAGE on plpgsql revoked while the relay runs: the claim has committed and answered
    when the notice is refused. Not an error: the write goes alone, and from then on claims
    write first (a refusal at every claim would stop the relay)."""
    import relay.store

    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "ab"])
    first = claim(store, run_length=1)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="c")])
    assert store._answers_early()  # checked, and allowed
    refused = "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege'; END$$"
    answer_now = (*relay.store.ANSWER_NOW[:-1], ("answer now", refused))
    monkeypatch.setattr(relay.store, "ANSWER_NOW", answer_now)
    written, (second,), returned = claim_then_write_parts(store, confirms(first))
    assert returned is None, "the claim had answered before the notice was refused"
    assert [e.key for e in second.events] == ["c"]
    assert written.owned == 2 and written.freed == FreedKeys(2, 0)
    assert set(statuses(pg_engine, outbox_schema).values()) == {"published", "pending"}
    assert key_leases(pg_engine, outbox_schema) == {"c": second.token}
    assert "cannot run a DO block" in caplog.text and not store._answers_early()
    write_events(pg_engine, outbox_schema, [Event(type="t", key="c")])
    settled = confirms(second)
    written, answers, third = claim_then_write_parts(store, settled)
    assert answers == [] and third is not None, "written first, returned with the write"
    assert [e.key for e in third.events] == ["c"], "written first: c taken again at once"
    assert written.freed == FreedKeys(1, 1)
