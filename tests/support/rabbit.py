"""Test helpers that observe and disturb a real RabbitMQ broker.

The relay's guarantees (confirms, per-key order, at-least-once) only mean something against
a real broker, so integration and fault tests need three things a mock cannot give:

* ``QueueTap``: a private durable queue that records every message the relay publishes, in
  arrival order, as ``Delivery`` records for ``tests.support.history.check_history``.
* ``close_connection_named``: kill exactly the relay's connection from the broker side, the
  way a network partition or a broker-side policy would, without touching anyone else's.
* ``broker_memory_alarm``: make the broker block publishers, to test back-pressure.

The broker may be shared with other test runs, so every name is unique, cleanup only ever
deletes what the helper itself created, and cleanup never raises (a test that killed the
broker on purpose must report its own failure, not a cleanup error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, TypedDict

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType
from pika.spec import Basic, BasicProperties

from tests.support.history import Delivery

logger = logging.getLogger(__name__)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: Header names the relay writes; the tap reads them back into ``Delivery`` records.
ORDERING_KEY_HEADER = "ordering-key"
SEQ_HEADER = "outbox-seq"

#: ``(method, properties, body)`` exactly as pika handed it to the consumer.
RawMessage = tuple[Basic.Deliver, BasicProperties, bytes]
# What identifies one message across a redelivery (whose redelivered flag differs):
# message_id, ordering key, seq and body.
_Identity = tuple[str, str | None, int, bytes]


def _identity(delivery: Delivery, body: bytes) -> _Identity:
    return (delivery.message_id, delivery.key, delivery.seq, body)


# Acknowledge in batches well below the prefetch window, so the broker never stalls waiting
# for acks while a round trip per message would not dominate a million-message drain.
_PREFETCH = 1000
_ACK_BATCH = 250
# How long one process_data_events call may block: bounds how late drain() notices timeouts.
_POLL_SECONDS = 0.2

# The CLI can live elsewhere (e.g. "docker exec rabbitmq rabbitmqctl" in CI).
_RABBITMQCTL = shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))
_RABBITMQCTL_TIMEOUT = 30.0

# The vm_memory_high_watermark of broker_memory_alarm(): any real broker uses more memory than
# 0.0001 % of RAM, so the alarm fires at once.
ALARM_WATERMARK = "0.000001"


def unique_name(prefix: str) -> str:
    """``prefix-1a2b3c4d``: the shared broker needs names no other test run can collide with."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def delivery_from_message(method: Basic.Deliver, properties: BasicProperties) -> Delivery:
    """Read the relay's identity headers back into a ``Delivery``.

    A message without the headers (not published by the relay) gets ``message_id=""`` and
    ``seq=-1`` instead of an exception: the tap keeps draining and the history checker then
    reports it as unexpected, which is the more useful failure.
    """
    headers: Mapping[str, Any] = properties.headers or {}
    key = headers.get(ORDERING_KEY_HEADER)
    seq = headers.get(SEQ_HEADER)
    return Delivery(
        message_id=properties.message_id or "",
        key=None if key is None else str(key),
        seq=-1 if seq is None else int(seq),
        redelivered=bool(method.redelivered),
    )


def _pump(connection: pika.BlockingConnection, seconds: float) -> None:
    """Process network events for at most ``seconds`` (returns early once something arrived)."""
    # types-pika declares time_limit as int, but pika takes any non-negative number.
    connection.process_data_events(time_limit=seconds)  # type: ignore[arg-type]


def _open(amqp_url: str, connection_name: str) -> pika.BlockingConnection:
    params = pika.URLParameters(amqp_url)
    params.client_properties = {"connection_name": connection_name}
    # Fail fast: a tap talking to a dead broker must give up within the test's own timeouts.
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


def _close_quietly(connection: pika.BlockingConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    try:
        connection.close()
    except Exception:  # the broker may be gone; the socket is released either way
        logger.debug("closing a tap connection failed", exc_info=True)


class QueueTap:
    """A uniquely named durable queue that records everything routed to it.

    Durable and not exclusive on purpose: fault tests kill connections and restart the broker,
    and the tap must keep its messages (and survive its own connection being killed) so that
    the recorded history reflects the relay, not the tap. If the tap's connection drops, the
    next ``drain`` reconnects. Deliveries not yet acknowledged are forgotten, because the
    broker redelivers exactly those; a redelivery of a message whose acknowledgement was in
    flight when the connection died (it may or may not have reached the broker) is
    recognised by its identity and recorded once. So the history contains neither loss nor
    duplicates caused by the tap itself.

    Use as a context manager: the queue is declared on enter and deleted, together with any
    exchange declared through ``declare_exchange``, on exit.
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, prefix: str = "tap") -> None:
        self.amqp_url = amqp_url
        self.queue = unique_name(prefix)
        #: Connection name shown by rabbitmqctl, so tests can tell the tap apart from the relay.
        self.connection_name = f"{self.queue}-conn"
        #: Every delivery so far, in arrival order.
        self.deliveries: list[Delivery] = []
        #: The same messages as pika delivered them, for assertions on properties and bodies.
        self.raw: list[RawMessage] = []
        self._exchanges: list[str] = []
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consuming = False
        self._acked = 0  # self.deliveries[: self._acked] are acknowledged (or maybe, see below)
        self._unacked = 0  # messages received on the current channel and not acknowledged
        self._last_tag = 0  # delivery tag of the newest message on the current channel
        # Identities of messages whose ack failed mid-flight: the broker may redeliver them.
        self._maybe_acked: Counter[_Identity] = Counter()

    def __enter__(self) -> QueueTap:
        try:
            channel = self._ensure_channel()
            channel.queue_declare(self.queue, durable=True, exclusive=False, auto_delete=False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def declare_exchange(self, name: str, type: str = "topic") -> str:
        """Declare a durable exchange that is deleted with the tap; returns ``name``."""
        self._ensure_channel().exchange_declare(
            name, exchange_type=ExchangeType(type), durable=True
        )
        self._exchanges.append(name)
        return name

    def bind(self, exchange: str, routing_key: str = "#") -> None:
        """Route messages published to ``exchange`` with a matching key into the tap."""
        self._ensure_channel().queue_bind(self.queue, exchange, routing_key=routing_key)

    def drain(self, expected: int, timeout: float) -> list[Delivery]:
        """Receive until ``expected`` messages in total arrived or ``timeout`` s pass idle.

        The timeout is an idle timeout (reset by each new message), so a large drain does
        not need a total time estimate, and a test expecting N messages still notices an
        extra (N+1)-th one if it drains again. Everything received is acknowledged before
        returning. Returns a copy of all deliveries so far.
        """
        idle_deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.deliveries) >= expected or time.monotonic() >= idle_deadline:
                    # Acknowledging can reveal a lost connection, which un-records deliveries.
                    self._ack_pending()
                    if len(self.deliveries) >= expected or time.monotonic() >= idle_deadline:
                        return list(self.deliveries)
                connection = self._ensure_consuming()
                before = len(self.deliveries)
                _pump(connection, max(0.0, min(idle_deadline - time.monotonic(), _POLL_SECONDS)))
                if len(self.deliveries) > before:
                    idle_deadline = time.monotonic() + timeout
                else:
                    self._ack_pending()  # idle: nothing is gained by holding acks back
            except (pika.exceptions.AMQPError, OSError) as exc:
                logger.warning("tap %s lost its connection (%r); reconnecting", self.queue, exc)
                self._drop_connection()
                if time.monotonic() >= idle_deadline:
                    return list(self.deliveries)
                time.sleep(min(0.2, max(0.0, idle_deadline - time.monotonic())))

    def message_count(self) -> int:
        """Messages ready in the tap's queue, from a passive declare.

        Once ``drain`` has started consuming, messages prefetched by this client but not yet
        drained are no longer "ready" on the broker and are not counted.
        """
        channel = self._ensure_connection().channel()
        try:
            count = channel.queue_declare(self.queue, passive=True).method.message_count
            return int(count or 0)
        finally:
            if channel.is_open:
                channel.close()

    def close(self) -> None:
        """Delete the queue and the exchanges this tap declared, then disconnect. Never raises."""
        names = f"queue {self.queue!r}" + "".join(f", exchange {e!r}" for e in self._exchanges)
        try:
            channel = self._ensure_channel()
        except Exception as exc:
            logger.warning("tap cleanup: cannot reach the broker to delete %s: %s", names, exc)
            self._drop_connection()
            return
        try:
            channel.queue_delete(self.queue)
            for exchange in self._exchanges:
                channel.exchange_delete(exchange)
            self._exchanges.clear()
        except Exception as exc:
            logger.warning("tap cleanup: deleting %s failed: %s", names, exc)
        finally:
            self._drop_connection()

    # -- connection management -------------------------------------------------------------

    def _ensure_connection(self) -> pika.BlockingConnection:
        if self._connection is None or not self._connection.is_open:
            self._drop_connection()
            self._connection = _open(self.amqp_url, self.connection_name)
        return self._connection

    def _ensure_channel(self) -> BlockingChannel:
        connection = self._ensure_connection()
        if self._channel is None or not self._channel.is_open:
            # A closed channel had its unacknowledged messages requeued by the broker.
            self._forget_unacked()
            self._channel = connection.channel()
            self._channel.basic_qos(prefetch_count=_PREFETCH)
        return self._channel

    def _ensure_consuming(self) -> pika.BlockingConnection:
        channel = self._ensure_channel()
        if not self._consuming:
            channel.basic_consume(self.queue, self._on_message, auto_ack=False)
            self._consuming = True
        assert self._connection is not None
        return self._connection

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        if method.delivery_tag is not None:
            self._last_tag = method.delivery_tag
        self._unacked += 1
        delivery = delivery_from_message(method, properties)
        identity = _identity(delivery, body)
        if method.redelivered and self._maybe_acked[identity] > 0:
            # Already recorded before the connection died; the earlier ack never arrived.
            self._maybe_acked[identity] -= 1
        else:
            self.raw.append((method, properties, body))
            self.deliveries.append(delivery)
        if self._unacked >= _ACK_BATCH:
            self._ack_pending()

    def _ack_pending(self) -> None:
        if self._unacked == 0 or self._channel is None:
            return
        received = len(self.deliveries)
        try:
            self._channel.basic_ack(self._last_tag, multiple=True)
        except BaseException:
            # The ack frame may or may not have reached the broker: keep these deliveries, and
            # remember them so that a redelivery is not recorded a second time.
            for index in range(self._acked, received):
                self._maybe_acked[_identity(self.deliveries[index], self.raw[index][2])] += 1
            self._acked = received
            self._unacked = 0
            raise
        self._acked = received
        self._unacked = 0

    def _forget_unacked(self) -> None:
        if len(self.deliveries) > self._acked:
            logger.info(
                "tap %s: forgetting %d unacknowledged deliveries; the broker redelivers them",
                self.queue,
                len(self.deliveries) - self._acked,
            )
            del self.deliveries[self._acked :]
            del self.raw[self._acked :]
        self._unacked = 0
        self._consuming = False
        self._last_tag = 0

    def _drop_connection(self) -> None:
        self._forget_unacked()
        _close_quietly(self._connection)
        self._connection = None
        self._channel = None


# -- rabbitmqctl -----------------------------------------------------------------------------


class RabbitmqctlError(RuntimeError):
    """rabbitmqctl is missing, timed out or failed; the message carries its output."""


class ConnectionInfo(TypedDict):
    """One AMQP connection as the broker sees it."""

    pid: str  # e.g. "<rabbit@localhost.1795462774.893.0>", what close_connection accepts
    name: str  # "127.0.0.1:52446 -> 127.0.0.1:5672"
    connection_name: str | None  # client_properties.connection_name, if the client set one


def rabbitmqctl(*args: str, timeout: float = _RABBITMQCTL_TIMEOUT) -> str:
    """Run ``rabbitmqctl -q ARGS`` and return stdout; raise RabbitmqctlError on any failure."""
    command = [*_RABBITMQCTL, "-q", *args]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise RabbitmqctlError(f"{command[0]} not found; set RABBITMQCTL to its path") from exc
    except subprocess.TimeoutExpired as exc:
        raise RabbitmqctlError(f"{shlex.join(command)} timed out after {timeout} s") from exc
    if result.returncode != 0:
        raise RabbitmqctlError(
            f"{shlex.join(command)} exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def _client_property(properties: list[list[Any]], name: str) -> Any:
    # JSON formatter renders a field table as [[name, type, value], ...].
    for entry in properties:
        if len(entry) == 3 and entry[0] == name:
            return entry[2]
    return None


def list_connections() -> list[ConnectionInfo]:
    """All AMQP connections on the node, with their client-chosen connection names.

    No single rabbitmqctl output format serves: ``--formatter json`` renders ``pid`` as
    ``"#PID<12576.893.0>"``, which ``close_connection`` rejects (``invalid_pid_syntax``),
    while the default tab-separated format prints the usable ``<rabbit@host.N.N.N>`` form but
    renders client properties as an Erlang-like term. So this asks twice and joins the rows
    on the peer address ``name`` ("ip:port -> ip:port"), which is unique per connection;
    a connection opened or closed between the two calls is left out.
    """
    pids: dict[str, str] = {}
    for line in rabbitmqctl("list_connections", "--no-table-headers", "pid", "name").splitlines():
        pid, sep, name = line.partition("\t")
        if sep:
            pids[name.strip()] = pid.strip()
    rows = json.loads(
        rabbitmqctl("list_connections", "name", "client_properties", "--formatter", "json") or "[]"
    )
    connections: list[ConnectionInfo] = []
    for row in rows:
        row_pid = pids.get(row["name"])
        if row_pid is None:
            continue
        connection_name = _client_property(row.get("client_properties") or [], "connection_name")
        connections.append(
            ConnectionInfo(
                pid=row_pid,
                name=row["name"],
                connection_name=None if connection_name is None else str(connection_name),
            )
        )
    return connections


def bytes_received_from(name: str) -> int:
    """Bytes the broker received on the open connections whose connection_name is `name`
    (`recv_oct`): tells a test that a client published, not merely connected."""
    rows = json.loads(
        rabbitmqctl("list_connections", "client_properties", "recv_oct", "--formatter", "json")
        or "[]"
    )
    return sum(
        int(row.get("recv_oct") or 0)
        for row in rows
        if _client_property(row.get("client_properties") or [], "connection_name") == name
    )


def close_connection_named(name: str, reason: str = "test") -> int:
    """Close, from the broker side, every connection whose connection_name is ``name``.

    Returns how many were closed; 0 means none matched (the caller decides if that is an
    error). Connections without that exact name are never touched: the broker is shared.
    """
    closed = 0
    for connection in list_connections():
        if connection["connection_name"] == name:
            rabbitmqctl("close_connection", connection["pid"], reason)
            closed += 1
    return closed


def memory_alarm_active() -> bool:
    """Whether the node currently has a memory alarm (it blocks all publishers)."""
    # JSON shape on 3.10: "alarms": [{"node": ..., "resource": "memory", "type": "resource_limit"}]
    status = json.loads(rabbitmqctl("status", "--formatter", "json"))
    return any(
        isinstance(alarm, dict) and alarm.get("resource") == "memory"
        for alarm in status.get("alarms") or []
    )


def memory_watermark() -> tuple[str, ...]:
    """The node's vm_memory_high_watermark as `set_vm_memory_high_watermark` arguments that
    set it back: `("0.4",)` for a fraction of RAM, `("absolute", "1073741824")` for bytes."""
    # JSON shape on 3.10: "vm_memory_high_watermark_setting": {"relative": 0.4}
    # (or {"absolute": 1073741824}).
    status = json.loads(rabbitmqctl("status", "--formatter", "json"))
    setting = status.get("vm_memory_high_watermark_setting") or {}
    if "relative" in setting:
        return (repr(float(setting["relative"])),)
    if "absolute" in setting:
        return ("absolute", str(int(setting["absolute"])))
    raise RabbitmqctlError(f"unknown vm_memory_high_watermark setting: {setting!r}")


def _wait_for_memory_alarm(active: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while memory_alarm_active() != active:
        if time.monotonic() > deadline:
            state = "raise" if active else "clear"
            raise RabbitmqctlError(f"the broker's memory alarm did not {state} within {timeout} s")
        time.sleep(0.2)


@contextlib.contextmanager
def broker_memory_alarm(timeout: float = 10.0) -> Iterator[None]:
    """Make the broker block every publishing connection while the block runs.

    Lowers vm_memory_high_watermark so far that the memory alarm fires, and yields only once
    the alarm is active, so publishers inside the block are blocked deterministically. The
    watermark the node had before is always restored (not a default: the node may be
    configured otherwise), even if the body or the wait fails, because a broker left in
    alarm would hang every other test on the shared broker.
    """
    previous = memory_watermark()
    try:
        rabbitmqctl("set_vm_memory_high_watermark", ALARM_WATERMARK)
        _wait_for_memory_alarm(active=True, timeout=timeout)
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *previous)
        # Waiting here keeps the next test from publishing into a still-blocked broker.
        _wait_for_memory_alarm(active=False, timeout=timeout)
