"""`Processor`: apply one message exactly once, in its key's order, or park it.

Why a message's effects happen once although the broker delivers at least once:
1. Its handlers run in one database transaction that begins by inserting the inbox row
   (consumer, message_id) with ON CONFLICT DO NOTHING. If the row exists, the message was
   applied before (its effects committed with that row) and the handlers are not run. A
   concurrent duplicate blocks on the first one's uncommitted row and then sees the conflict.
2. The broker gets the ack only after the commit (the caller acks on return). A crash before
   the commit rolls back the effects and the row together, and the redelivery applies it; a
   crash between commit and ack makes the redelivery a duplicate (rule 1).
3. Per key, the last applied `outbox-seq` is kept in a row that is locked for the rest of the
   transaction: one key's messages are applied one at a time even if a key moved queues and
   two consumers hold its messages, and a message older than the last applied one is never
   applied after it (it is parked as stale, for an operator to look at).

Failures keep order: a handler that raises is retried in place, each attempt in a fresh
transaction, with backoff. After the last attempt the message is parked and the key is marked
parked, so the key's later messages are parked behind it (and acked) while other keys go on.
An operator's `retry` makes a running consumer replay the key's parked messages in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox.consumer.errors import ConsumerError, InboxUnavailableError
from outbox.consumer.handlers import Handlers, Subscription
from outbox.consumer.message import Message, UndecodableMessageError
from outbox.consumer.schema import (
    BLOCKING_REASONS,
    REASON_BEHIND,
    REASON_FAILED,
    REASON_STALE,
    REASON_UNDECODABLE,
    InboxStatements,
    KeyState,
    ParkedMessage,
)
from outbox.consumer.tracing import ProcessSpans
from outbox.decoding import PayloadDecodeError
from outbox.domain import DomainEventError

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("outbox.consumer")

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_MIN = 0.1
DEFAULT_RETRY_MAX = 5.0
DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_CLEANUP_BATCH = 1000
_ERROR_CHARS = 4000


class Outcome(enum.Enum):
    HANDLED = "handled"
    IGNORED = "ignored"  # no handler subscribes to the type: recorded as applied, nothing ran
    DUPLICATE = "duplicate"
    STALE = "stale"  # older than the key's last applied seq: parked, not applied
    PARKED = "parked"
    SUPERSEDED = "superseded"  # a replay found its parked row already handled by another


@dataclasses.dataclass(frozen=True)
class Result:
    outcome: Outcome
    attempts: int = 0
    reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """In-place retries of a failing handler: `max_attempts` tries, delays doubling."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_min: float = DEFAULT_RETRY_MIN
    retry_max: float = DEFAULT_RETRY_MAX

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConsumerError(f"max_attempts must be 1 or more, got {self.max_attempts}")
        if not 0 <= self.retry_min <= self.retry_max:
            raise ConsumerError(
                f"retry delays need 0 <= retry_min <= retry_max, got {self.retry_min} and "
                f"{self.retry_max}"
            )

    def delay(self, attempt: int) -> float:
        return float(min(self.retry_max, self.retry_min * 2 ** (attempt - 1)))


class _Park(Exception):
    """Raised inside an attempt: roll back and park the message without retrying."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


ResultHook = Callable[[Message, Result, float], None]


class Processor:
    """Applies messages for one consumer group. Not thread-safe: one per consuming thread."""

    def __init__(
        self,
        handlers: Handlers,
        sessions: Callable[[], Session],
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_result: ResultHook | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`tracer_provider`: for the CONSUMER spans around each message (OpenTelemetry, when
        installed); the global one when None."""
        self.handlers = handlers
        self.sessions = sessions
        self.policy = policy or RetryPolicy()
        self.sleep = sleep
        self.on_result = on_result
        self.statements = InboxStatements(handlers.inbox, handlers.name)
        self._spans = ProcessSpans(handlers.name, tracer_provider)

    # -- live messages ---------------------------------------------------------------------

    def process(self, message: Message, *, queue: str | None = None) -> Result:
        """Apply, skip or park `message`; when this returns, the caller may ack it.

        Raises InboxUnavailableError when the database connection fails: do not ack then.
        `queue` (the queue it came from) names its trace span.
        """
        started = time.perf_counter()
        with (
            self._spans.process(message, queue=queue) as note,
            _outages(f"{_describe_message(message)} was in hand"),
        ):
            result = self._run(message, None)
            note(result)
        if result.outcome is Outcome.DUPLICATE:
            # Rare (a redelivery after a crash, a relay duplicate) and worth seeing.
            log.info(
                "skipped duplicate %s: applied before",
                _describe_message(message),
                extra=_log_fields(message),
            )
        if self.on_result is not None:
            self.on_result(message, result, time.perf_counter() - started)
        return result

    def _run(self, message: Message, parked: ParkedMessage | None) -> Result:
        if message.problem and parked is None:
            return self._park(message, REASON_UNDECODABLE, message.problem, attempts=0)
        attempt = 0
        while True:
            attempt += 1
            try:
                return dataclasses.replace(self._attempt(message, parked), attempts=attempt)
            except _Park as park:
                return self._give_up(message, parked, park.reason, park.error, attempt)
            except InboxUnavailableError:
                raise
            except Exception as exc:
                if _is_outage(exc):
                    raise InboxUnavailableError(
                        f"the database connection failed while {_describe_message(message)} was "
                        f"in hand: {_first_line(exc)}"
                    ) from exc
                error = _describe(exc)
                log.warning(
                    "handler failed on %s (attempt %d of %d): %s",
                    _describe_message(message),
                    attempt,
                    self.policy.max_attempts,
                    _first_line(exc),
                    extra=_log_fields(
                        message, attempt=attempt, max_attempts=self.policy.max_attempts
                    ),
                )
                if attempt >= self.policy.max_attempts:
                    return self._give_up(message, parked, REASON_FAILED, error, attempt)
                self.sleep(self.policy.delay(attempt))

    def _attempt(self, message: Message, parked: ParkedMessage | None) -> Result:
        st = self.statements
        with self.sessions() as session, session.begin():
            connection = session.connection()
            if parked is None:
                if not st.claim(connection, message.message_id):
                    return Result(Outcome.DUPLICATE)
                state = (
                    st.lock_key(connection, message.key, advance_to=message.seq)
                    if message.key
                    else None
                )
                if state is not None and state.parked:
                    st.unclaim(connection, message.message_id)
                    st.park(
                        connection,
                        message,
                        reason=REASON_BEHIND,
                        error=f"key {message.key!r} is parked: this message waits behind it "
                        "(see `outbox-relay inbox parked list`)",
                        attempts=0,
                    )
                    return Result(Outcome.PARKED, reason=REASON_BEHIND)
            else:
                state = st.lock_key(connection, message.key) if message.key else None
                if not self._still_head(connection, parked):
                    return Result(Outcome.SUPERSEDED)
                if not st.claim(connection, message.message_id):
                    self._finish_parked(connection, parked, state)
                    return Result(Outcome.DUPLICATE)
            if (
                state is not None
                and message.seq is not None
                and state.last_seq is not None
                and message.seq <= state.last_seq
                and not (parked is not None and parked.reason == REASON_STALE)
            ):
                return self._stale(connection, message, parked, state)
            subscriptions = self.handlers.for_type(message.type)
            if subscriptions:
                event = self._decode(message, subscriptions)
                for subscription in subscriptions:
                    subscription.function(event if subscription.typed else message, session)
                session.flush()
            if parked is not None:
                self._finish_parked(connection, parked, state, applied_seq=message.seq)
            # A live message's seq was recorded by lock_key(advance_to=...) already.
        return Result(Outcome.HANDLED if subscriptions else Outcome.IGNORED)

    def _stale(
        self,
        connection: Connection,
        message: Message,
        parked: ParkedMessage | None,
        state: KeyState,
    ) -> Result:
        st = self.statements
        st.unclaim(connection, message.message_id)
        error = (
            f"seq {message.seq} of key {message.key!r} arrived after seq {state.last_seq} was "
            "applied (a key that moved queues, or an event requeued after later ones): not "
            "applied; `inbox parked retry --id ID` applies it anyway, `inbox parked skip --id "
            "ID` drops it"
        )
        log.warning(
            "%s: %s",
            _describe_message(message),
            error,
            extra=_log_fields(message, reason=REASON_STALE),
        )
        if parked is None:
            st.park(connection, message, reason=REASON_STALE, error=error, attempts=0)
        else:
            st.note_failure(connection, parked.id, error=error, attempts=0, reason=REASON_STALE)
            self._set_parked_flag(connection, parked.message.key, state)
        return Result(Outcome.STALE, reason=REASON_STALE, error=error)

    def _decode(self, message: Message, subscriptions: tuple[Subscription, ...]) -> Any:
        if not any(s.typed for s in subscriptions):
            return None
        try:
            return self.handlers.events.decode(message.type, message.version, message.payload())
        except (DomainEventError, PayloadDecodeError, UndecodableMessageError) as exc:
            raise _Park(REASON_UNDECODABLE, str(exc)) from exc

    # -- parking ---------------------------------------------------------------------------

    def _give_up(
        self,
        message: Message,
        parked: ParkedMessage | None,
        reason: str,
        error: str,
        attempts: int,
    ) -> Result:
        if parked is None:
            return self._park(message, reason, error, attempts)
        with self.sessions() as session, session.begin():
            connection = session.connection()
            self.statements.note_failure(
                connection, parked.id, error=error, attempts=attempts, reason=reason
            )
            if message.key:
                self.statements.clear_retry_requests(connection, message.key)
        log.error(
            "replay of %s failed again: %s",
            _describe_message(message),
            _first_line(error),
            extra=_log_fields(message, attempt=attempts, reason=reason),
        )
        return Result(Outcome.PARKED, attempts=attempts, reason=reason, error=error)

    def _park(self, message: Message, reason: str, error: str, attempts: int) -> Result:
        st = self.statements
        with self.sessions() as session, session.begin():
            connection = session.connection()
            if message.key:
                st.lock_key(connection, message.key)
            st.park(connection, message, reason=reason, error=error, attempts=attempts)
            if message.key:
                st.set_key(connection, message.key, parked=True)
        log.error(
            "parked %s%s (%s): %s",
            _describe_message(message),
            f" and its key {message.key!r}" if message.key else "",
            reason,
            _first_line(error),
            extra=_log_fields(message, attempt=attempts, reason=reason),
        )
        return Result(Outcome.PARKED, attempts=attempts, reason=reason, error=error)

    # -- replaying parked messages ---------------------------------------------------------

    def retry_requested(self, limit: int = 100) -> int:
        """Replay parked messages an operator asked to retry; returns how many were handled.

        A key's messages are replayed from its head, in arrival order, including those parked
        behind it after the request, until the key is clear or its head fails again.
        """
        with _outages("parked messages were replayed"):
            return self._retry_requested(limit)

    def _retry_requested(self, limit: int) -> int:
        st = self.statements
        with self.sessions() as session, session.begin():
            requested = st.retry_requested(session.connection(), limit)
        done = 0
        keys: list[str] = []
        for row in requested:
            if row.message.key is None or row.reason == REASON_STALE:
                done += self._replay_one(row)
            elif row.message.key not in keys:
                keys.append(row.message.key)
        for key in keys:
            done += self._replay_key(key)
        return done

    def _replay_key(self, key: str) -> int:
        done = 0
        while True:
            with self.sessions() as session, session.begin():
                connection = session.connection()
                head = self.statements.parked_head(connection, key)
                if head is None:
                    self._set_parked_flag(
                        connection, key, self.statements.lock_key(connection, key)
                    )
            if head is None:
                return done
            if not head.retry_requested and done == 0:
                return done  # a newer request covers it; nothing asked for this head
            replayed = self._replay_one(head)
            if replayed == 0:
                return done
            done += replayed

    def _replay_one(self, row: ParkedMessage) -> int:
        started = time.perf_counter()
        with self._spans.process(row.message) as note:
            result = self._run(row.message, row)
            note(result)
        if self.on_result is not None:
            self.on_result(row.message, result, time.perf_counter() - started)
        if result.outcome is Outcome.PARKED:
            return 0
        log.info(
            "replayed parked %s: %s",
            _describe_message(row.message),
            result.outcome.value,
            extra=_log_fields(row.message),
        )
        return 1

    def _still_head(self, connection: Connection, parked: ParkedMessage) -> bool:
        current = self.statements.parked_by_id(connection, parked.id)
        if current is None:
            return False
        if parked.message.key is None or current.reason not in BLOCKING_REASONS:
            return True
        head = self.statements.parked_head(connection, parked.message.key)
        return head is not None and head.id == parked.id

    def _finish_parked(
        self,
        connection: Connection,
        parked: ParkedMessage,
        state: KeyState | None,
        *,
        applied_seq: int | None = None,
    ) -> None:
        self.statements.delete_parked(connection, parked.id)
        key = parked.message.key
        if key is not None and state is not None:
            self._set_parked_flag(connection, key, state, applied_seq=applied_seq)

    def _set_parked_flag(
        self,
        connection: Connection,
        key: str | None,
        state: KeyState,
        *,
        applied_seq: int | None = None,
    ) -> None:
        if key is None:
            return
        still = self.statements.has_blocking(connection, key)
        if still != state.parked or applied_seq is not None:
            self.statements.set_key(connection, key, last_seq=applied_seq, parked=still)

    def parked_counts(self) -> tuple[int, int]:
        """(parked messages, parked keys) of this consumer group."""
        with _outages("parked messages were counted"), self.sessions() as session:
            return self.statements.count_parked(session.connection())

    # -- retention -------------------------------------------------------------------------

    def cleanup(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        batch: int = DEFAULT_CLEANUP_BATCH,
        max_batches: int = 100,
        now: dt.datetime | None = None,
    ) -> int:
        """Delete inbox rows older than `retention` seconds, `batch` rows per transaction.

        Key rows not touched within the retention go too (never a parked key's). A duplicate
        that arrives after its inbox row is gone is still caught by its key's seq (parked as
        stale) while the key's row exists; otherwise it would be applied again: keep the
        retention well above the longest redelivery delay you expect.
        """
        cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=retention)
        deleted = 0
        for _ in range(max_batches):
            with _outages("the inbox was cleaned up"), self.sessions() as session, session.begin():
                connection = session.connection()
                count = self.statements.delete_old(connection, cutoff, batch)
                count += self.statements.delete_old_keys(connection, cutoff, batch)
            deleted += count
            if count < batch:
                break
        return deleted


@contextlib.contextmanager
def _outages(doing: str) -> Iterator[None]:
    """Turn a lost database connection into InboxUnavailableError (the caller reconnects)."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        if not _is_outage(exc):
            raise
        raise InboxUnavailableError(
            f"the database connection failed while {doing}: {_first_line(exc)}"
        ) from exc


def _is_outage(exc: BaseException) -> bool:
    """A lost or refused database connection, as opposed to an error of the handler's work."""
    if not isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return False
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in {"57P01", "57P02", "57P03"}


def _first_line(value: BaseException | str) -> str:
    text = value if isinstance(value, str) else f"{type(value).__name__}: {value}"
    lines = text.strip().splitlines()
    return lines[0] if lines else text


def _describe(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def _log_fields(message: Message, **context: Any) -> dict[str, Any]:
    """The `extra=` of a log line about `message`: in the relay CLI's JSON log format these
    become top-level keys, named as the relay names them (relay/logs.py `EVENT_FIELDS`)."""
    return {
        "event_id": message.message_id,
        "event_type": message.type,
        "event_key": message.key,
        "seq": message.seq,
        **context,
    }


def _describe_message(message: Message) -> str:
    seq = f" seq {message.seq}" if message.seq is not None else ""
    return f"{message.type or '?'} message {message.message_id or '?'}{seq}"
