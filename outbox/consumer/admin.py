"""What operators do with parked messages: list, show, ask for a retry, skip the head.

A retry is a request: it marks the messages, and a running consumer of the group replays
them (it has the handlers; this module does not need them). Skipping takes the key's lock,
so it never races a consumer that is applying the same key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import sqlalchemy as sa

from outbox.consumer.errors import ParkedMessageNotFoundError
from outbox.consumer.schema import BLOCKING_REASONS, Inbox, InboxStatements, ParkedMessage

_ALL = 10_000_000


@dataclasses.dataclass(frozen=True)
class Skipped:
    message: ParkedMessage
    still_parked: int  # messages of the same key still parked behind it


class ParkedAdmin:
    def __init__(self, engine: sa.Engine, inbox: Inbox, consumer: str) -> None:
        self.engine = engine
        self.statements = InboxStatements(inbox, consumer)

    def parked(self, *, key: str | None = None, limit: int = 50) -> list[ParkedMessage]:
        with self.engine.connect() as connection:
            return self.statements.parked(connection, key=key, limit=limit)

    def counts(self) -> tuple[int, int]:
        with self.engine.connect() as connection:
            return self.statements.count_parked(connection)

    def show(self, parked_id: int) -> ParkedMessage:
        with self.engine.connect() as connection:
            row = self.statements.parked_by_id(connection, parked_id)
        if row is None:
            raise ParkedMessageNotFoundError(
                f"no parked message {parked_id} for consumer {self.statements.consumer!r} "
                "(see `outbox-relay inbox parked list`)"
            )
        return row

    def plan_retry(
        self, *, keys: Sequence[str] = (), ids: Sequence[int] = (), everything: bool = False
    ) -> list[ParkedMessage]:
        """The parked messages a retry with this selection would replay, in order.

        A key or --all selects the messages that hold keys back (and keyless ones); a stale
        message is only retried by its id, because applying it means applying it late.
        """
        st = self.statements
        with self.engine.connect() as connection:
            if everything:
                rows = st.parked(connection, limit=_ALL)
                return [r for r in rows if r.reason in BLOCKING_REASONS]
            by_key = {
                key: [
                    r
                    for r in st.parked(connection, key=key, limit=_ALL)
                    if r.reason in BLOCKING_REASONS
                ]
                for key in keys
            }
            by_id = {i: st.parked_by_id(connection, i) for i in ids}
        missing = [f"key {k!r}" for k, rows in by_key.items() if not rows]
        missing += [f"id {i}" for i, row in by_id.items() if row is None]
        if missing:
            raise ParkedMessageNotFoundError(
                f"not parked for consumer {st.consumer!r}: {', '.join(missing)}; nothing was "
                "changed"
            )
        chosen = {r.id: r for rows in by_key.values() for r in rows}
        chosen.update({i: r for i, r in by_id.items() if r is not None})
        return [chosen[i] for i in sorted(chosen)]

    def request_retry(self, rows: Sequence[ParkedMessage]) -> int:
        """Mark `rows` for replay; for a key's head, also what is parked behind it."""
        keys = sorted(
            {
                r.message.key
                for r in rows
                if r.message.key is not None and r.reason in BLOCKING_REASONS
            }
        )
        ids = [r.id for r in rows if r.message.key is None or r.reason not in BLOCKING_REASONS]
        done = 0
        with self.engine.begin() as connection:
            for key in keys:
                done += self.statements.request_retry(connection, key=key)
            if ids:
                done += self.statements.request_retry(connection, ids=ids)
        return done

    def head(self, key: str) -> ParkedMessage:
        with self.engine.connect() as connection:
            head = self.statements.parked_head(connection, key)
        if head is None:
            raise ParkedMessageNotFoundError(
                f"key {key!r} is not parked for consumer {self.statements.consumer!r}"
            )
        return head

    def skip(self, parked_id: int) -> Skipped:
        """Drop one parked message: it is recorded in the inbox as applied, never run.

        For a key's head, the key stays parked while messages wait behind it (retry them);
        it flows again once none is left.
        """
        st = self.statements
        with self.engine.begin() as connection:
            row = st.parked_by_id(connection, parked_id)
            if row is None:
                raise ParkedMessageNotFoundError(f"no parked message {parked_id}: nothing skipped")
            key = row.message.key
            if key is not None:
                st.lock_key(connection, key)
                head = st.parked_head(connection, key)
                if row.reason in BLOCKING_REASONS and head is not None and head.id != row.id:
                    raise ParkedMessageNotFoundError(
                        f"parked message {parked_id} is not the head of key {key!r} (message "
                        f"{head.id} is): skip the head first, or retry the key"
                    )
            st.delete_parked(connection, parked_id)
            # A redelivery or a republish of the skipped message is then a duplicate.
            st.claim(connection, row.message.message_id)
            still = 0
            if key is not None:
                still = len(
                    [
                        r
                        for r in st.parked(connection, key=key, limit=_ALL)
                        if r.reason in BLOCKING_REASONS
                    ]
                )
                st.set_key(connection, key, parked=still > 0)
        return Skipped(message=row, still_parked=still)
