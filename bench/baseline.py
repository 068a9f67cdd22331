"""Raw pika publishing throughput: the ceiling the relay's benchmarks are compared with.

The relay adds database reads, bookkeeping and ordering on top of "publish persistent
messages with confirms"; to tell how much that costs, benchmarks need the same publishing
done with nothing else: same message shape, same confirm window, same broker. This module
is that baseline. It uses SelectConnection (asynchronous) with a window of unconfirmed
messages, because publishing one message and waiting for its confirm measures latency, not
throughput, and would make any relay look fast.

Two entry points:

* ``raw_pika_throughput``: publishes relay-like messages it makes up itself (a rate).
* ``publish_messages``: publishes exactly the ``OutgoingMessage``s the relay would send (built
  from the same outbox rows), with the properties ``relay.publisher`` sets, and returns a
  ``BaselineRun`` with the time from connecting to the last confirm (like a relay run, which
  also starts unconnected) and from the first publish to the last confirm.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from collections.abc import Sequence

import pika
import pika.channel
import pika.connection
import pika.frame
import pika.spec
from pika.adapters.select_connection import SelectConnection

from relay.messages import OutgoingMessage

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

# One message ready to go: exchange, routing key, body, properties.
Prepared = tuple[str, str, bytes, pika.BasicProperties]


class BaselineError(RuntimeError):
    """The baseline run did not get every message confirmed and routed."""


@dataclasses.dataclass(frozen=True)
class BaselineRun:
    """One baseline run: every message confirmed and routed (or BaselineError was raised)."""

    messages: int
    window: int
    total_seconds: float  # from opening the connection to the last confirm
    publish_seconds: float  # from the first publish to the last confirm
    broker_blocked: bool  # the broker blocked publishers during the run (a disturbed run)
    # CPU of this process over the run (`publish_messages`: building the properties too, as
    # the relay's publisher does for every message), against the relay's CPU per event.
    cpu_seconds: float = 0.0

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds / self.messages * 1e6 if self.messages else 0.0

    @property
    def rate(self) -> float:
        """Messages per second, connection set-up included (comparable with a relay run)."""
        return self.messages / self.total_seconds if self.total_seconds > 0 else float("inf")

    @property
    def publish_rate(self) -> float:
        """Messages per second from the first publish on."""
        return self.messages / self.publish_seconds if self.publish_seconds > 0 else float("inf")


def properties_of(message: OutgoingMessage) -> pika.BasicProperties:
    """The AMQP properties `relay.publisher.AmqpPublisher` sends for `message`."""
    return pika.BasicProperties(
        delivery_mode=2,
        message_id=message.message_id,
        type=message.type,
        timestamp=message.timestamp,
        headers=dict(message.headers),
        correlation_id=message.correlation_id,
        content_type=message.content_type,
        app_id=message.app_id,
    )


class _WindowedPublisher:
    """State machine of one run; each pika callback advances it on the ioloop thread."""

    def __init__(
        self,
        *,
        n: int,
        keys: int,
        queue: str,
        exchange: str,
        window: int,
        body_size: int,
        amqp_url: str,
        timeout: float,
        prepared: Sequence[Prepared] | None = None,
    ) -> None:
        self._n = n if prepared is None else len(prepared)
        self._keys = keys
        self._queue = queue
        self._exchange = exchange
        self._window = window
        self._body_size = body_size
        self._prepared = prepared
        self._params = pika.URLParameters(amqp_url)
        self._params.client_properties = {
            "connection_name": f"bench-baseline-{uuid.uuid4().hex[:8]}"
        }
        self._timeout = timeout
        self._connection: SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._published = 0
        self._confirmed = 0  # acked or nacked
        self._nacked = 0
        self._returned = 0
        # Unconfirmed delivery tags in publish order; tags confirmed out of order wait in
        # _early until everything before them is confirmed too. This keeps multiple=True
        # acks O(1) amortised regardless of the window size.
        self._outstanding: collections.deque[int] = collections.deque()
        self._early: set[int] = set()
        self._started = 0.0
        self._first_publish = 0.0
        self._last_confirm = 0.0
        self._error: str | None = None
        self._done = False
        self.blocked = False

    def run(self) -> float:
        """Publish everything; return messages per second from the first publish on."""
        self.run_timed()
        elapsed = self._last_confirm - self._first_publish
        return self._n / elapsed if elapsed > 0 else float("inf")

    def run_timed(self) -> BaselineRun:
        self._started = time.perf_counter()
        self._connection = SelectConnection(
            self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
        )
        ioloop = self._connection.ioloop
        ioloop.call_later(self._timeout, self._on_timeout)
        try:
            ioloop.start()
        finally:
            if not self._connection.is_closed:
                # An exception escaped a callback: close cleanly; on_close stops the loop.
                self._fail("aborted by an exception")
                ioloop.start()
            ioloop.close()

        if self._error is not None:
            raise BaselineError(self._error)
        if self._nacked or self._returned:
            raise BaselineError(
                f"{self._nacked} of {self._n} messages nacked and {self._returned} returned "
                f"unroutable (exchange={self._exchange!r}, routing key={self._queue!r})"
            )
        return BaselineRun(
            messages=self._n,
            window=self._window,
            total_seconds=self._last_confirm - self._started,
            publish_seconds=self._last_confirm - self._first_publish,
            broker_blocked=self.blocked,
        )

    # -- connection and channel lifecycle ---------------------------------------------------

    def _on_connection_open(self, connection: pika.connection.Connection) -> None:
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_blocked(self, connection: pika.connection.Connection, frame: object) -> None:
        self.blocked = True

    def _on_connection_open_error(
        self, connection: pika.connection.Connection, error: str | Exception
    ) -> None:
        self._error = f"cannot connect to RabbitMQ: {error!r}"
        self._stop()

    def _on_connection_closed(
        self, connection: pika.connection.Connection, reason: Exception
    ) -> None:
        if not self._done and self._error is None:
            self._error = f"connection closed before all confirms arrived: {reason!r}"
        self._stop()

    def _stop(self) -> None:
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_select_ok)

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: Exception) -> None:
        if not self._done:
            self._fail(f"channel closed before all confirms arrived: {reason!r}")

    def _on_timeout(self) -> None:
        self._fail(
            f"timed out after {self._timeout} s with {self._confirmed} of {self._n} confirmed"
        )

    def _fail(self, error: str) -> None:
        if self._error is None:
            self._error = error
        connection = self._connection
        assert connection is not None
        if connection.is_open:
            connection.close()
        elif connection.is_closed:
            self._stop()
        # else: opening or closing; pika reports through the open-error or close callback.

    # -- publishing -------------------------------------------------------------------------

    def _on_select_ok(self, frame: pika.frame.Method[pika.spec.Confirm.SelectOk]) -> None:
        # Confirm mode is on only now: publishing earlier would leave messages unconfirmed.
        self._first_publish = time.perf_counter()
        self._publish_more()

    def _publish_more(self) -> None:
        if self._prepared is not None:
            self._publish_prepared(self._prepared)
            return
        channel = self._channel
        assert channel is not None
        filler = "x" * self._body_size
        while self._published < self._n and len(self._outstanding) < self._window:
            seq = self._published
            head = f'{{"type":"bench.event","seq":{seq},"pad":"'
            body = head + filler[: max(0, self._body_size - len(head) - 2)] + '"}'
            properties = pika.BasicProperties(
                message_id=str(uuid.uuid4()),
                type="bench.event",
                content_type="application/json",
                delivery_mode=2,  # persistent, like every outbox event
                headers={"ordering-key": f"k{seq % self._keys}", "outbox-seq": seq},
            )
            channel.basic_publish(
                self._exchange, self._queue, body.encode(), properties, mandatory=True
            )
            self._published += 1
            self._outstanding.append(self._published)  # delivery tags count from 1

    def _publish_prepared(self, prepared: Sequence[Prepared]) -> None:
        channel = self._channel
        assert channel is not None
        while self._published < self._n and len(self._outstanding) < self._window:
            exchange, routing_key, body, properties = prepared[self._published]
            channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
            self._published += 1
            self._outstanding.append(self._published)

    def _on_return(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Return,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        # The broker still acks a returned message, so it is only counted here.
        self._returned += 1

    def _on_confirm(
        self, frame: pika.frame.Method[pika.spec.Basic.Ack | pika.spec.Basic.Nack]
    ) -> None:
        method = frame.method
        settled = self._settle(int(method.delivery_tag or 0), bool(method.multiple))
        self._confirmed += settled
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked += settled
        if self._confirmed >= self._n:
            self._last_confirm = time.perf_counter()
            self._done = True
            assert self._connection is not None
            self._connection.close()
        else:
            self._publish_more()

    def _settle(self, tag: int, multiple: bool) -> int:
        """Mark ``tag`` (and with ``multiple`` all before it) confirmed; return how many new."""
        outstanding = self._outstanding
        settled = 0
        if multiple:
            while outstanding and outstanding[0] <= tag:
                head = outstanding.popleft()
                if head in self._early:
                    self._early.discard(head)
                else:
                    settled += 1
            return settled
        if tag in self._early or not outstanding or tag < outstanding[0]:
            return 0  # already confirmed
        settled = 1
        if outstanding[0] == tag:
            outstanding.popleft()
            while outstanding and outstanding[0] in self._early:
                self._early.discard(outstanding.popleft())
        else:
            self._early.add(tag)
        return settled


def raw_pika_throughput(
    n: int,
    keys: int,
    queue: str,
    exchange: str,
    window: int = 1000,
    body_size: int = 200,
    amqp_url: str = DEFAULT_AMQP_URL,
    timeout: float = 300.0,
) -> float:
    """Publish ``n`` relay-shaped messages with confirms; return messages per second.

    Messages are persistent and mandatory, routed with ``exchange`` and routing key
    ``queue`` (so ``exchange=""`` targets the queue directly), carry relay-like properties
    (uuid4 message_id, type "bench.event", JSON content type, ``ordering-key`` header cycling
    over ``keys`` keys, ``outbox-seq`` header 0..n-1) and a JSON body of ``body_size`` bytes.
    Up to ``window`` messages are unconfirmed at any time. The rate is measured from the first
    publish to the last confirm. Raises BaselineError if any message is nacked or returned
    unroutable, or if the run cannot finish within ``timeout`` seconds.
    """
    if n < 1 or keys < 1 or window < 1:
        raise ValueError(f"n, keys and window must be positive, got {n=}, {keys=}, {window=}")
    publisher = _WindowedPublisher(
        n=n,
        keys=keys,
        queue=queue,
        exchange=exchange,
        window=window,
        body_size=body_size,
        amqp_url=amqp_url,
        timeout=timeout,
    )
    return publisher.run()


def publish_messages(
    messages: Sequence[OutgoingMessage],
    *,
    window: int,
    exchange: str | None = None,
    amqp_url: str = DEFAULT_AMQP_URL,
    timeout: float = 300.0,
) -> BaselineRun:
    """Publish exactly these relay messages (persistent, mandatory, with confirms).

    The properties are those `relay.publisher` sets; ``exchange`` overrides each message's
    exchange (to aim the same messages at a baseline queue). Properties are built before the
    clock starts, so this is the ceiling for publishing these messages on one channel with
    ``window`` unconfirmed at a time. Raises BaselineError as `raw_pika_throughput` does.
    """
    if not messages or window < 1:
        raise ValueError(f"need messages and a positive window, got {len(messages)}, {window=}")
    cpu_before = time.process_time()
    prepared = [
        (
            message.exchange if exchange is None else exchange,
            message.routing_key,
            message.body,
            properties_of(message),
        )
        for message in messages
    ]
    publisher = _WindowedPublisher(
        n=len(prepared),
        keys=1,
        queue=prepared[0][1],
        exchange=prepared[0][0],
        window=window,
        body_size=0,
        amqp_url=amqp_url,
        timeout=timeout,
        prepared=prepared,
    )
    run = publisher.run_timed()
    return dataclasses.replace(run, cpu_seconds=time.process_time() - cpu_before)
