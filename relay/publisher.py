"""Publishes outgoing messages to RabbitMQ with publisher confirms, on one asyncio loop.

pika is not thread-safe: its `AsyncioConnection` lives on one event loop and only that loop's
thread touches it. Whose loop that is decides the publisher's shape:

* given a `loop` (the relay daemon): the loop of the relay's own thread, which runs it while it
  waits (`relay.mailbox.LoopMailbox`). Confirms then reach the relay in the thread that read
  them. Every method must be called from that thread.
* without one: a daemon thread of its own runs a private loop; other threads talk to it only
  through `loop.call_soon_threadsafe`.

Every message handed to `publish()` gets exactly one `PublishOutcome`, whatever happens to the
connection: that is the base of the relay's at-least-once guarantee (an outcome that never
arrives would leave an outbox row in flight forever; two would double-count attempts).

Bookkeeping shared with other threads (readiness, messages waiting to be published, messages
waiting for a confirm) lives under one lock, so that `stop()` can settle whatever an I/O loop
that did not finish in time still holds, without a message being settled twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, cast

import pika
import pika.exceptions
import tenacity
from pika import spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.exchange_type import ExchangeType

from relay.amqp_frames import (
    EncodingError,
    PublishEncoder,
    chunks,
    frames_encoder,
    send_written,
    write_frames,
)
from relay.broker_errors import describe_error, quiet_pika, refusal
from relay.broker_urls import node_label, parse_amqp_urls, split_amqp_urls
from relay.channel_blame import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Sent,
    blame,
    distribution_header_error,
    too_large_error,
)
from relay.confirms import ConfirmWindow, Entry
from relay.messages import (
    BrokerStatus,
    Outcome,
    OutgoingMessage,
    PublisherEvent,
    PublishOutcome,
    Sink,
)
from relay.urls import mask_text, mask_url

logger = logging.getLogger("relay.publisher")

_P = ParamSpec("_P")

NOT_CONNECTED = "broker not connected"
NACKED = (
    "nacked by broker: it refused responsibility for the message; likely causes: a queue "
    "length limit (x-max-length with x-overflow reject-publish), a disk or memory alarm, or an "
    "internal error (see the broker's log)"
)

# A channel the broker closes while we declare the exchange with this code means the exchange
# exists with another type or other arguments: reconnecting cannot fix that.
LEASE_OVER = "not sent: its lease ran out before the I/O loop got to it"
_PRECONDITION_FAILED = 406
_ACCESS_REFUSED = 403


def _encoding_error(error: BaseException) -> str:
    return str(error) if isinstance(error, EncodingError) else repr(error)


class AmqpPublisher:
    """`relay.messages.Publisher` on a pika `AsyncioConnection` (see the module docstring)."""

    def __init__(
        self,
        amqp_url: str,
        sink: Sink,
        *,
        connection_name: str,
        exchange: str,
        exchange_type: str = "topic",
        declare_exchange: bool = True,
        heartbeat: int = 30,
        blocked_connection_timeout: float = 30.0,
        reconnect_wait_min: float = 0.5,
        reconnect_wait_max: float = 10.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # One entry per cluster node, tried in order; the thread moves to the next one when
        # its node refuses a connection or goes away.
        self._nodes = parse_amqp_urls(amqp_url)
        for params in self._nodes:
            params.client_properties = {"connection_name": connection_name}
            params.heartbeat = heartbeat
            params.blocked_connection_timeout = blocked_connection_timeout
            # The thread's own loop does the retrying (with backoff, interruptible by stop()).
            params.connection_attempts = 1
            params.socket_timeout = 5
        self._urls_for_logs = [mask_url(url) for url in split_amqp_urls(amqp_url)]
        self._node_index = 0  # I/O loop only: the node of the current (or next) connection
        self._failed_connects = 0  # I/O loop only: failed attempts in a row, over all nodes
        self._sink = sink
        self._connection_name = connection_name
        self._exchange = exchange
        self._exchange_type = exchange_type
        # The default exchange ("") always exists and cannot be declared.
        self._declare_exchange = declare_exchange and exchange != ""

        # `multiplier` rather than the `initial` alias, which tenacity 9 deprecates (and the
        # test suite turns warnings into errors). Jitter spreads the reconnects of many relays
        # that lost the same broker at the same moment.
        self._wait = tenacity.wait_exponential_jitter(
            multiplier=reconnect_wait_min, max=reconnect_wait_max, jitter=reconnect_wait_min
        )
        retrying = tenacity.Retrying(wait=self._wait)
        self._connect_backoff = tenacity.RetryCallState(retrying, None, (), {})
        self._channel_backoff = tenacity.RetryCallState(retrying, None, (), {})

        # The loop the connection lives on: the owner's (driven), or made at start() for a
        # thread of our own.
        self._driven = loop is not None
        self._loop = loop
        self._task: asyncio.Task[None] | None = None  # driven: the connection lifecycle
        self._lock = threading.Lock()
        # -- guarded by _lock ---------------------------------------------------------------
        self._thread: threading.Thread | None = None
        self._connection: AsyncioConnection | None = None
        self._loop_open = False  # a connection exists: scheduling work on the loop is useful
        self._ready = False
        self._stopping = False
        self._books_closed = False  # stop() settled everything; late I/O events settle nothing
        self._inbox: list[Sequence[OutgoingMessage]] = []
        self._drain_scheduled = False
        self._confirms = ConfirmWindow()
        self._sent: dict[int, Sent] = {}  # relay tag -> what a channel close is judged on
        # Bodies larger than this are refused before they are sent. A broker configured lower
        # says so in the channel close; its figure is adopted from then on.
        self._max_message_size = max_message_size
        # -- I/O loop only ------------------------------------------------------------------
        self._channel: Channel | None = None
        self._encoder: PublishEncoder | None = None  # of the channel, once it confirms
        self._declaring = False
        self._refused_nodes: set[int] = set()  # nodes that refused the login or vhost at start
        self._fatal = False
        self._lost_handled = True
        self._abort_error: BaseException | None = None
        # message_id -> errors of returned messages whose ack has not arrived yet (the broker
        # sends basic.return before the ack of the same message).
        self._returned: dict[str, collections.deque[str]] = {}
        self._published_total = 0
        self._connection_ended: asyncio.Future[None] | None = None  # of the current connection
        self._wake = asyncio.Event()  # set by stop(): no more waiting before a reconnect
        self._publish_inbox_cb = self._guard(self._publish_inbox)
        self._ever_ready = False  # a refused login is permanent only before the first success
        quiet_pika()

    # -- public API ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def connection_name(self) -> str:
        return self._connection_name

    @property
    def published_total(self) -> int:
        """basic.publish frames sent since start, over all connections (confirmed or not)."""
        return self._published_total

    @property
    def node(self) -> str:
        """`host:port` of the node the publisher is connected to (or trying next)."""
        return node_label(self._nodes[self._node_index])

    @property
    def in_flight(self) -> int:
        """Messages published and waiting for their confirm."""
        return len(self._confirms)

    def start(self) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("an AmqpPublisher cannot be started again after stop()")
            if self._thread is not None or self._task is not None:
                return
            if self._loop is not None:
                self._loop.set_exception_handler(self._on_loop_exception)
                self._task = self._loop.create_task(self._run())
                return
            loop = self._loop = asyncio.new_event_loop()
            loop.set_exception_handler(self._on_loop_exception)
            self._thread = threading.Thread(
                target=self._run_thread,
                args=(loop,),
                name=f"amqp-publisher-{self._connection_name}",
                daemon=True,
            )
            self._thread.start()

    def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        with self._lock:
            accepted = self._ready and self._loop_open and self._connection is not None
            if accepted:
                # A copy: the caller may reuse its list before the I/O loop gets to it.
                self._inbox.append(tuple(messages))
                if not self._drain_scheduled:
                    # One wake-up carries every batch handed over until the I/O loop runs.
                    self._call_soon(self._publish_inbox_cb)
                    self._drain_scheduled = True
        if not accepted:
            self._emit([PublishOutcome(m.tag, Outcome.UNKNOWN, NOT_CONNECTED) for m in messages])

    def flush(self) -> None:
        """Driven, on the loop's thread (see `Publisher.flush`): the batches handed over are
        encoded and written now, and their frames pushed onto the socket."""
        if not self._driven:
            return
        with self._lock:
            scheduled = self._drain_scheduled
        if scheduled:
            self._publish_inbox_cb()  # the call still scheduled finds nothing left
        connection = self._connection
        if connection is not None and connection.is_open:
            self._guard(lambda: send_written(connection))()

    def stop(self, timeout: float) -> None:
        with self._lock:
            self._stopping = True
            self._ready = False
            thread = self._thread
            if self._loop_open and self._connection is not None:
                self._call_soon(self._close_from_io)
        self._call_soon(self._wake.set)
        if self._driven:
            self._finish_driven(timeout)
        elif thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "publisher %s: I/O thread did not finish within %.1f s; "
                    "settling its in-flight messages as unknown",
                    self._connection_name,
                    timeout,
                )
        # Normally the I/O thread has settled everything; this catches a thread that did not
        # finish in time, or messages handed over after it stopped looking.
        with self._lock:
            self._books_closed = True
            entries = self._confirms.take_all()
            self._sent.clear()
            inbox = self._take_inbox()
        self._emit(
            self._settle_all(
                entries, inbox, Outcome.UNKNOWN, "publisher stopped", use_returns=False
            )
        )

    def _finish_driven(self, timeout: float) -> None:
        """Run the owner's loop (from its thread, between its own steps) until the connection
        has closed and the lifecycle ended, at most `timeout` seconds."""
        task, loop = self._task, self._loop
        if task is None or loop is None or task.done() or loop.is_closed():
            return
        if loop.is_running():
            raise RuntimeError("AmqpPublisher.stop() must not be called from a loop callback")
        # run_forever rather than run_until_complete: outcomes settled while closing reach
        # the owner's mailbox, which stops the loop to be read; here that only means go on.
        task.add_done_callback(lambda _: loop.stop())
        deadline = time.monotonic() + timeout
        while not task.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning(
                    "publisher %s: connection did not close within %.1f s; "
                    "settling its in-flight messages as unknown",
                    self._connection_name,
                    timeout,
                )
                return
            timer = loop.call_later(remaining, loop.stop)
            try:
                loop.run_forever()
            finally:
                timer.cancel()

    def _call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the I/O loop. Driven, the caller is the loop's own thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if self._driven:
                loop.call_soon(callback)
            else:
                loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop closed meanwhile: nothing left to tell it
            pass

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception out of pika itself (our callbacks are guarded): its state is unknown,
        so the connection is treated as lost."""
        error = context.get("exception")
        logger.error(
            "publisher %s: I/O loop error: %s",
            self._connection_name,
            context.get("message", "unknown"),
            exc_info=error if isinstance(error, BaseException) else None,
        )
        self._on_internal_error(error if isinstance(error, BaseException) else RuntimeError("?"))

    # -- I/O loop: connection lifecycle ------------------------------------------------------

    def _run_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_until_complete(self._run())
        finally:
            with self._lock:
                self._loop_open = False
            loop.close()

    async def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping or self._fatal:
                        break
                await self._run_connection()
                with self._lock:
                    if self._stopping or self._fatal:
                        break
                # The next node; walking the list after a failed connect is immediate, and
                # the backoff applies once every node has failed (and after a node loss).
                self._node_index = (self._node_index + 1) % len(self._nodes)
                delay = 0.0
                if self._failed_connects % len(self._nodes) == 0:
                    delay = self._wait(self._connect_backoff)
                    self._connect_backoff.attempt_number += 1
                logger.info(
                    "publisher %s: connecting to %s in %.2f s",
                    self._connection_name,
                    self._url_for_logs,
                    delay,
                )
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        except Exception:  # pragma: no cover - last resort; _run_connection catches
            # publish() keeps answering UNKNOWN ("not connected"): _ready stays False.
            logger.exception("publisher %s: connection lifecycle crashed", self._connection_name)
        finally:
            logger.info("publisher %s: I/O loop finished", self._connection_name)

    async def _run_connection(self) -> None:
        """One connection, from opening until it has ended; every outcome settled."""
        self._lost_handled = False
        self._abort_error = None
        ended = self._connection_ended = asyncio.get_running_loop().create_future()
        try:
            with self._lock:
                if self._stopping:
                    return
                connection = AsyncioConnection(
                    self._nodes[self._node_index],
                    on_open_callback=self._guard(self._on_connection_open),
                    on_open_error_callback=self._guard(self._on_connection_open_error),
                    on_close_callback=self._guard(self._on_connection_closed),
                    custom_ioloop=asyncio.get_running_loop(),
                )
                self._connection = connection
                self._loop_open = True
        except Exception as exc:
            logger.exception("publisher %s: cannot create a connection", self._connection_name)
            self._on_connection_lost(exc)
            return
        try:
            await ended
        except asyncio.CancelledError:
            # The owner closes its loop after stop() timed out (a broker that stopped
            # answering never sends close-ok): drop the socket, which nothing else would.
            with contextlib.suppress(Exception):
                if not connection.is_closed:
                    cast(Any, connection)._adapter_disconnect_stream()  # no public abort
            raise
        finally:
            with self._lock:
                self._loop_open = False
                self._connection = None
                self._ready = False
            # Normally a no-op (the close callbacks already settled everything).
            self._on_connection_lost(RuntimeError("I/O loop ended"))
            self._channel = None

    def _end_connection(self, connection: Any) -> None:
        """The connection is over (closed, or never opened): the lifecycle moves on."""
        ended = self._connection_ended
        if connection is self._connection and ended is not None and not ended.done():
            ended.set_result(None)

    @property
    def _url_for_logs(self) -> str:
        return self._urls_for_logs[self._node_index]

    def _on_connection_open(self, connection: Any) -> None:
        logger.info(
            "publisher %s: connected to node %s (%s)",
            self._connection_name,
            self.node,
            self._url_for_logs,
        )
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._open_channel()

    def _on_blocked(self, connection: Any, frame: Any) -> None:
        reason = getattr(frame.method, "reason", "")
        logger.warning(
            "publisher %s: broker blocked publishing (%s); connection closes after %s s",
            self._connection_name,
            reason,
            self._nodes[self._node_index].blocked_connection_timeout,
        )

    def _on_unblocked(self, connection: Any, frame: Any) -> None:
        logger.info("publisher %s: broker unblocked publishing", self._connection_name)

    def _on_connection_open_error(self, connection: Any, error: BaseException | str) -> None:
        try:
            refused = refusal(error)
            if refused is not None and not self._ever_ready:
                self._refused_nodes.add(self._node_index)
            if (
                refused is not None
                and not self._ever_ready
                and len(self._refused_nodes) >= len(self._nodes)
            ):
                # At start, once every node refused: the same credentials and vhost would be
                # refused on every retry. (Another node may still accept them, so one refusal
                # moves on; later, e.g. while credentials rotate, it is retried like an outage.)
                self._fatal = True
                self._lost_handled = True  # settled here, with the refusal as the reason
                with self._lock:
                    self._ready = False
                    entries = self._confirms.take_all()
                    inbox = self._take_inbox()
                events = self._settle_all(entries, inbox, Outcome.UNKNOWN, refused)
                events.append(BrokerStatus(up=False, error=refused, fatal=True, refused=True))
                self._emit(events)
                return
            self._failed_connects += 1
            logger.warning(
                "publisher %s: cannot connect to %s: %s",
                self._connection_name,
                self._url_for_logs,
                describe_error(error),
            )
            self._on_connection_lost(error)
        finally:
            self._end_connection(connection)

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        try:
            error = self._abort_error or reason
            if not self._stopping:
                logger.warning(
                    "publisher %s: connection lost: %s",
                    self._connection_name,
                    describe_error(error),
                )
            self._on_connection_lost(error)
        finally:
            # Without this, the lifecycle never moves on and nothing reconnects.
            self._end_connection(connection)

    def _on_connection_lost(self, error: BaseException | str) -> None:
        """Settle everything of this connection (idempotent until the next connection)."""
        if self._lost_handled:
            return
        self._lost_handled = True
        with self._lock:
            self._ready = False
            entries = self._confirms.take_all()
            self._sent.clear()
            inbox = self._take_inbox()
        description = "publisher stopped" if self._stopping else describe_error(error)
        events = self._settle_all(
            entries, inbox, Outcome.UNKNOWN, f"connection lost: {description}"
        )
        self._channel = None
        self._declaring = False
        if not self._fatal:  # the fatal status was reported already
            events.append(BrokerStatus(up=False, error=description, node=self.node))
        self._emit(events)

    def _close_from_io(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            if connection.is_closed:
                self._end_connection(connection)
            elif not connection.is_closing:
                connection.close()
        except Exception:
            logger.exception("publisher %s: closing the connection failed", self._connection_name)
            self._end_connection(connection)

    # -- I/O loop: channel lifecycle -------------------------------------------------------

    def _open_channel(self) -> None:
        connection = self._connection
        if connection is None or not connection.is_open or self._stopping or self._fatal:
            return
        connection.channel(on_open_callback=self._guard(self._on_channel_open))

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._guard(self._on_channel_closed))
        channel.add_on_return_callback(self._guard(self._on_return))
        if self._declare_exchange:
            self._declaring = True
            channel.exchange_declare(
                exchange=self._exchange,
                # pika sends any string (plugins add exchange types); the stubs only name the
                # built-in ones.
                exchange_type=cast(ExchangeType, self._exchange_type),
                durable=True,
                callback=self._guard(functools.partial(self._on_exchange_declared, channel)),
            )
        else:
            self._enable_confirms(channel)

    def _on_exchange_declared(self, channel: Channel, frame: Any) -> None:
        self._declaring = False
        if channel is self._channel:
            self._enable_confirms(channel)

    def _enable_confirms(self, channel: Channel) -> None:
        channel.confirm_delivery(
            ack_nack_callback=self._guard(functools.partial(self._on_confirm, channel)),
            callback=self._guard(functools.partial(self._on_select_ok, channel)),
        )

    def _on_select_ok(self, channel: Channel, frame: Any) -> None:
        if channel is not self._channel:
            return
        with self._lock:
            # Never non-empty (a closing channel settles its messages); settled defensively
            # rather than dropped, because tags restart at 1 on every channel.
            leftovers = self._confirms.new_channel()
            self._ready = not self._stopping
        self._encoder = frames_encoder(channel)
        if leftovers:
            logger.error(
                "publisher %s: %d unsettled messages from an old channel",
                self._connection_name,
                len(leftovers),
            )
            self._emit(
                [PublishOutcome(tag, Outcome.UNKNOWN, "channel replaced") for tag, _ in leftovers]
            )
        self._connect_backoff.attempt_number = 1
        self._channel_backoff.attempt_number = 1
        self._ever_ready = True
        self._failed_connects = 0
        logger.info(
            "publisher %s: ready (confirms on, exchange %r)", self._connection_name, self._exchange
        )
        self._emit([BrokerStatus(up=True, node=self.node)])

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        declaring, self._declaring = self._declaring, False
        connection = self._connection
        if connection is None or not connection.is_open or self._stopping:
            return  # part of a connection close: _on_connection_lost settles
        by_broker = isinstance(reason, pika.exceptions.ChannelClosedByBroker)
        reply_code = (
            reason.reply_code if isinstance(reason, pika.exceptions.ChannelClosedByBroker) else None
        )
        description = describe_error(reason)
        logger.warning("publisher %s: channel closed: %s", self._connection_name, description)

        if declaring and reply_code in (_PRECONDITION_FAILED, _ACCESS_REFUSED):
            # The exchange exists with other settings, or the user may not configure it:
            # retrying changes neither.
            self._fatal = True
            logger.error(
                "publisher %s: exchange %r cannot be declared as durable %s: %s",
                self._connection_name,
                self._exchange,
                self._exchange_type,
                description,
            )
            with self._lock:
                self._ready = False
            self._emit([BrokerStatus(up=False, error=description, fatal=True)])
            connection.close()
            return

        with self._lock:
            was_ready = self._ready
            self._ready = False
            entries = self._confirms.take_all()
            sent = [self._sent.pop(tag) for tag, _ in entries if tag in self._sent]
            self._sent.clear()
            inbox = self._take_inbox()
        events = self._settle_all(entries, inbox, Outcome.UNKNOWN, f"channel closed: {description}")
        if by_broker:
            # Only the message(s) the close is the fault of spend an attempt; the others only
            # shared the channel (relay/channel_blame.py says why that is safe).
            verdict = blame(reply_code, getattr(reason, "reply_text", ""), sent)
            if verdict.max_message_size is not None:
                self._max_message_size = min(self._max_message_size, verdict.max_message_size)
            events = [
                PublishOutcome(
                    e.tag, Outcome.REJECTED, mask_text(verdict.error), retryable=verdict.retryable
                )
                if isinstance(e, PublishOutcome)
                and e.outcome is Outcome.UNKNOWN
                and e.tag in verdict.blamed
                else e
                for e in events
            ]
        events.append(BrokerStatus(up=False, error=description))
        self._emit(events)

        # A channel that worked is replaced at once (one bad publish closed it); one that
        # failed while being set up backs off, so that a broker refusing it is not hammered.
        delay = 0.0
        if not was_ready:
            delay = self._wait(self._channel_backoff)
            self._channel_backoff.attempt_number += 1
        connection.ioloop.call_later(delay, self._guard(self._open_channel))

    # -- I/O loop: publishing and confirms -------------------------------------------------

    def _publish_inbox(self) -> None:
        with self._lock:
            batches = self._take_inbox()
        if not batches:
            return
        channel = self._channel
        connection = self._connection
        encoder = self._encoder
        usable = (
            channel is not None
            and channel.is_open
            and connection is not None
            and connection.is_open
            and encoder is not None
            and self._ready
            and not self._stopping
        )
        refusal = "publisher stopped" if self._stopping else NOT_CONNECTED
        frames: list[bytes] = []
        published: list[Entry] = []
        sent: list[Sent] = []
        events: list[PublisherEvent] = []
        now = time.monotonic()
        for batch in batches:
            for message in batch:
                if not usable or encoder is None:
                    events.append(PublishOutcome(message.tag, Outcome.UNKNOWN, refusal))
                    continue
                if message.send_by is not None and now >= message.send_by:
                    events.append(PublishOutcome(message.tag, Outcome.UNKNOWN, LEASE_OVER))
                    continue
                bad_header = distribution_header_error(message.headers)
                if bad_header is not None:
                    # The broker would close the channel on it without naming it: refuse it
                    # here, for good, rather than let it cost the messages around it.
                    events.append(
                        PublishOutcome(message.tag, Outcome.REJECTED, bad_header, retryable=False)
                    )
                    continue
                if len(message.body) > self._max_message_size:
                    # The broker would close the channel on it, and with it every other
                    # message in flight: refuse it here, for good.
                    events.append(
                        PublishOutcome(
                            message.tag,
                            Outcome.REJECTED,
                            too_large_error(len(message.body), self._max_message_size),
                            retryable=False,
                        )
                    )
                    continue
                try:
                    frames += encoder.encode(message)
                except Exception as exc:
                    # Encoded before anything is written: nothing was sent and the channel
                    # is intact. Encoding is deterministic: the same message would fail again
                    # on any connection, so it is refused for good, except when memory ran
                    # out (that may pass; the attempt it spends bounds the retries).
                    retryable = isinstance(exc, MemoryError)
                    logger.warning(
                        "publisher %s: cannot encode message %s: %s",
                        self._connection_name,
                        message.message_id,
                        _encoding_error(exc),
                    )
                    events.append(
                        PublishOutcome(
                            message.tag,
                            Outcome.REJECTED,
                            f"cannot encode message: {_encoding_error(exc)}",
                            retryable=retryable,
                        )
                    )
                    continue
                published.append((message.tag, message.message_id))
                sent.append(Sent(message.tag, message.exchange, len(message.body)))
        with self._lock:
            if self._books_closed:
                events.extend(
                    PublishOutcome(tag, Outcome.UNKNOWN, "publisher stopped")
                    for tag, _ in published
                )
                frames.clear()
            else:
                self._confirms.published(published)
                self._sent.update((s.tag, s) for s in sent)
                self._published_total += len(published)
        try:
            if frames and connection is not None:
                # After the books: should the write fail, the connection's close settles
                # every message of the window, these included.
                write_frames(connection, chunks(frames))
        finally:
            # The outcomes settled here go out whatever the write did.
            self._emit(events)

    def _on_return(
        self, channel: Channel, method: Any, properties: spec.BasicProperties, body: bytes
    ) -> None:
        if channel is not self._channel or properties.message_id is None:
            return
        error = (
            f"unroutable: {method.reply_code} {method.reply_text} "
            f"(exchange={method.exchange}, routing_key={method.routing_key})"
        )
        self._returned.setdefault(properties.message_id, collections.deque()).append(error)

    def _on_confirm(self, channel: Channel, frame: Any) -> None:
        if channel is not self._channel:
            return
        method = frame.method
        acked = isinstance(method, spec.Basic.Ack)
        with self._lock:
            entries = self._confirms.settle(int(method.delivery_tag), bool(method.multiple))
            for tag, _ in entries:
                self._sent.pop(tag, None)
        if not entries:
            return
        events: list[PublisherEvent] = []
        for tag, message_id in entries:
            returned = self._take_returned(message_id)
            if not acked:
                events.append(PublishOutcome(tag, Outcome.REJECTED, NACKED))
            elif returned is not None:
                events.append(PublishOutcome(tag, Outcome.REJECTED, returned))
            else:
                events.append(PublishOutcome(tag, Outcome.CONFIRMED))
        self._emit(events)

    # -- bookkeeping (callers hold _lock unless noted) ---------------------------------------

    def _take_inbox(self) -> list[Sequence[OutgoingMessage]]:
        inbox, self._inbox = self._inbox, []
        self._drain_scheduled = False
        return inbox

    def _settle_all(
        self,
        entries: Sequence[Entry],
        inbox: Sequence[Sequence[OutgoingMessage]],
        outcome: Outcome,
        error: str,
        *,
        use_returns: bool = True,
    ) -> list[PublisherEvent]:
        """Outcomes for messages the channel or connection can no longer confirm: `outcome`,
        except a message the broker returned (routed nowhere: its fate is known); those not
        yet published are UNKNOWN. With `use_returns`, I/O loop only."""
        events: list[PublisherEvent] = []
        for tag, message_id in entries:
            returned = self._take_returned(message_id) if use_returns else None
            if returned is not None:
                events.append(PublishOutcome(tag, Outcome.REJECTED, returned))
            else:
                events.append(PublishOutcome(tag, outcome, error))
        events.extend(
            PublishOutcome(m.tag, Outcome.UNKNOWN, error) for batch in inbox for m in batch
        )
        if use_returns:
            self._returned.clear()
        return events

    def _take_returned(self, message_id: str) -> str | None:
        """I/O loop only: the return error recorded for this message, consumed."""
        errors = self._returned.get(message_id)
        if not errors:
            return None
        error = errors.popleft()
        if not errors:
            del self._returned[message_id]
        return error

    # -- plumbing ----------------------------------------------------------------------------

    def _emit(self, events: Sequence[PublisherEvent]) -> None:
        if not events:
            return
        if self._books_closed:
            # After stop() returned, the owner no longer listens for status changes.
            events = [e for e in events if not isinstance(e, BrokerStatus)]
            if not events:
                return
        try:
            self._sink(events)
        except Exception:
            # Reconnecting would not repair the sink; the relay's lease reclaims the rows.
            logger.exception(
                "publisher %s: sink failed; %d events dropped", self._connection_name, len(events)
            )

    def _guard(self, callback: Callable[_P, None]) -> Callable[_P, None]:
        """Wrap an I/O-thread callback: an exception is logged and ends the connection."""

        @functools.wraps(callback)
        def guarded(*args: _P.args, **kwargs: _P.kwargs) -> None:
            try:
                callback(*args, **kwargs)
            except Exception as exc:
                logger.exception(
                    "publisher %s: error in I/O callback %s",
                    self._connection_name,
                    getattr(getattr(callback, "func", callback), "__name__", "callback"),
                )
                self._on_internal_error(exc)

        return guarded

    def _on_internal_error(self, error: BaseException) -> None:
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            # Outcomes are settled by the close callback, reported with the real cause.
            self._abort_error = error
            try:
                connection.close()
                return
            except Exception:
                logger.debug("closing after an internal error failed", exc_info=True)
        self._on_connection_lost(error)
        if connection is not None:
            self._end_connection(connection)
