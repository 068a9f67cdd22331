"""A broker that merely drops the connection during the AMQP handshake is an outage, not a
refusal: the relay goes on to the next node (found by review: it used to exit 4).

pika turns *any* StreamLostError / ConnectionClosedByBroker while the connection is in its
START phase into ProbableAuthenticationError, and in its TUNE phase into
ProbableAccessDeniedError (pika/connection.py `_on_stream_terminated`, "heuristically deduce").
`relay.broker_errors.refusal()` treats both as "the broker refused the login / vhost", and
`AmqpPublisher._on_connection_open_error` then sets `_fatal` before the first success, without
walking to the next node. Transient causes that land there: a node shutting down
(320 CONNECTION_FORCED), a vhost that is recovering ("530 NOT_ALLOWED - vhost / is down"),
a connection limit reached (530 "connection limit (N) is reached"), a TCP reset by a proxy
or a booting node mid-handshake.

A fake node (127.0.0.1, a free port) speaks the handshake and then fails it in these ways;
the second URL is the real broker. Expected: the publisher moves on to the real node and gets
ready. Actual: BrokerStatus(fatal=True, refused=True) — the relay exits with code 4.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pika.exceptions
import pytest
from pika import frame, spec

from relay.broker_errors import refusal
from relay.messages import BrokerStatus, PublisherEvent
from relay.publisher import AmqpPublisher

REAL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _start_frame() -> bytes:
    return frame.Method(
        0,
        spec.Connection.Start(
            version_major=0,
            version_minor=9,
            server_properties={"product": "fake", "capabilities": {}},
            mechanisms="PLAIN AMQPLAIN",
            locales="en_US",
        ),
    ).marshal()


def _tune_frame() -> bytes:
    return frame.Method(
        0, spec.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=60)
    ).marshal()


class FakeNode:
    """Accepts connections and fails each handshake in the configured way."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            try:
                conn.settimeout(3)
                conn.recv(8)  # protocol header
                conn.sendall(_start_frame())
                conn.recv(4096)  # Start-Ok
                if self.mode == "drop_in_start":
                    pass  # e.g. a node stopping: the socket just closes
                elif self.mode == "forced_in_start":
                    conn.sendall(
                        frame.Method(
                            0,
                            spec.Connection.Close(
                                320,
                                "CONNECTION_FORCED - broker forced connection closure "
                                "with reason 'shutdown'",
                                0,
                                0,
                            ),
                        ).marshal()
                    )
                    time.sleep(0.2)
                elif self.mode == "vhost_down_in_tune":
                    conn.sendall(_tune_frame())
                    conn.recv(4096)  # Tune-Ok + Connection.Open
                    conn.sendall(
                        frame.Method(
                            0,
                            spec.Connection.Close(530, "NOT_ALLOWED - vhost / is down", 10, 40),
                        ).marshal()
                    )
                    time.sleep(0.2)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.thread.join(2)


@pytest.fixture(params=["drop_in_start", "forced_in_start", "vhost_down_in_tune"])
def fake_node(request: pytest.FixtureRequest) -> Iterator[FakeNode]:
    node = FakeNode(request.param)
    yield node
    node.close()


def test_handshake_failure_of_first_node_does_not_stop_the_relay(fake_node: FakeNode) -> None:
    events: list[PublisherEvent] = []
    lock = threading.Lock()

    def sink(batch: Sequence[PublisherEvent]) -> None:
        with lock:
            events.extend(batch)

    publisher = AmqpPublisher(
        f"amqp://guest:guest@127.0.0.1:{fake_node.port}/%2F,{REAL}",
        sink,
        connection_name="review-refusal",
        exchange="",
        declare_exchange=False,
        reconnect_wait_min=0.05,
        reconnect_wait_max=0.2,
    )
    publisher.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                statuses = [e for e in events if isinstance(e, BrokerStatus)]
            if any(s.up for s in statuses) or any(s.fatal for s in statuses):
                break
            time.sleep(0.05)
    finally:
        publisher.stop(3)
    assert fake_node.accepted >= 1
    fatal = [s for s in statuses if s.fatal]
    assert not fatal, f"transient handshake failure treated as permanent refusal: {fatal}"
    assert any(s.up for s in statuses), statuses


@pytest.mark.parametrize(
    "error",
    [
        # What pika raises for a reset during START / a 320 during START / a 530 in TUNE.
        pika.exceptions.ProbableAuthenticationError(
            repr(pika.exceptions.StreamLostError("Transport indicated EOF"))
        ),
        pika.exceptions.ProbableAuthenticationError(
            repr(pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown"))
        ),
        pika.exceptions.ProbableAccessDeniedError(
            repr(pika.exceptions.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost / is down"))
        ),
        pika.exceptions.ProbableAccessDeniedError(
            repr(
                pika.exceptions.ConnectionClosedByBroker(
                    530,
                    "NOT_ALLOWED - access to vhost '/' refused for user 'relay': "
                    "connection limit (10) is reached",
                )
            )
        ),
    ],
)
def test_refusal_ignores_transient_causes(error: BaseException) -> None:
    assert refusal(error) is None, refusal(error)
