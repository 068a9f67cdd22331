"""The fault proxy itself: each fault must look to a client exactly like the real network fault.

The relay's fault tests trust this proxy. If `reset_all` produced an EOF instead of a reset, or a
blackhole leaked bytes, those tests would pass for the wrong reason. The upstream here is a local
echo server, so these tests need no external services.
"""

from __future__ import annotations

import queue
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import FaultProxy

TIMEOUT = 2.0  # Per socket operation; any test that hits it fails well within its budget.
SHORT = 0.3  # How long "nothing arrives" is watched for.


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echoes until EOF, then reports how the connection ended ("eof" or "reset")."""

    server: _EchoServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        outcome = "eof"
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = f"error: {exc!r}"
        self.server.outcomes.put(outcome)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.outcomes: queue.Queue[str] = queue.Queue()

    @property
    def port(self) -> int:
        port: int = self.socket.getsockname()[1]
        return port


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()  # Joins the handler threads: the proxy has closed their sockets.


@pytest.fixture
def proxy(echo: _EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy
    assert fault_proxy.errors == []


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


def round_trip(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def free_port() -> int:
    """A port nothing listens on (it was free a moment ago, which is enough on a test box)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_bytes_flow_both_ways_and_are_counted(proxy: FaultProxy) -> None:
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    with connect(proxy) as client:
        assert round_trip(client, b"hello") == b"hello"
        assert round_trip(client, b"x" * 1000) == b"x" * 1000
        assert proxy.connection_count == 1
    proxy.wait_until(lambda: proxy.connection_count == 0)
    assert (proxy.accepted_total, proxy.bytes_up, proxy.bytes_down) == (1, 1005, 1005)


def test_half_close_is_passed_on(proxy: FaultProxy, echo: _EchoServer) -> None:
    with connect(proxy) as client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b"last words"
    assert echo.outcomes.get(timeout=TIMEOUT) == "eof"


def test_large_transfer_arrives_intact(proxy: FaultProxy) -> None:
    # 3 MiB: more than the proxy buffers per side, so full send buffers and partial sends occur.
    payload = bytes(range(256)) * (12 * 1024)
    failures: list[BaseException] = []
    with connect(proxy) as client:

        def send() -> None:
            try:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                failures.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            received = recv_until_eof(client)
        finally:
            sender.join(TIMEOUT)
    assert failures == []
    assert received == payload
    assert proxy.bytes_up == proxy.bytes_down == len(payload)


def test_latency_delays_each_direction_and_keeps_order(proxy: FaultProxy) -> None:
    latency = 0.15
    proxy.set_latency(latency)
    with connect(proxy) as client:
        started = time.monotonic()
        for part in (b"a", b"b", b"c", b"d"):
            client.sendall(part)
        assert recv_exactly(client, 4) == b"abcd"
        # Each chunk is held `latency` on the way up and again on the way back.
        assert time.monotonic() - started >= 2 * latency - 0.001


def test_heal_releases_delayed_bytes_at_once(proxy: FaultProxy) -> None:
    proxy.set_latency(60.0)
    with connect(proxy) as client:
        client.sendall(b"held")
        proxy.heal()
        assert recv_exactly(client, 4) == b"held"  # Well before the 60 s, or recv times out.


def test_negative_latency_is_rejected(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set_latency(-1.0)


def test_reset_all_resets_both_sides(proxy: FaultProxy, echo: _EchoServer) -> None:
    with connect(proxy) as client:
        round_trip(client)
        proxy.reset_all()
        assert proxy.connection_count == 0
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    assert echo.outcomes.get(timeout=TIMEOUT) == "reset"
    with connect(proxy) as again:
        assert round_trip(again) == b"ping"


def test_close_all_closes_both_sides_gracefully(proxy: FaultProxy, echo: _EchoServer) -> None:
    with connect(proxy) as client:
        round_trip(client)
        proxy.close_all()
        assert proxy.connection_count == 0
        assert client.recv(1) == b""
    assert echo.outcomes.get(timeout=TIMEOUT) == "eof"
    with connect(proxy) as again:
        assert round_trip(again) == b"ping"


def test_blackhole_drops_bytes_but_keeps_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as before:
        round_trip(before)
        proxy.blackhole()
        counted = (proxy.bytes_up, proxy.bytes_down)

        before.sendall(b"lost")
        before.settimeout(SHORT)
        with pytest.raises(TimeoutError):
            before.recv(1)

        with connect(proxy) as during:
            proxy.wait_until(lambda: proxy.connection_count == 2)  # Accepted, nothing flows.
            during.sendall(b"lost too")
            during.settimeout(SHORT)
            with pytest.raises(TimeoutError):
                during.recv(1)
        assert (proxy.bytes_up, proxy.bytes_down) == counted

        proxy.heal()
        with connect(proxy) as after:
            assert round_trip(after) == b"ping"
        # The dropped bytes never reached the echo server, so the old stream is still in step.
        before.settimeout(TIMEOUT)
        assert round_trip(before, b"back") == b"back"


def test_refuse_closes_the_port_and_heal_reopens_it(proxy: FaultProxy) -> None:
    port = proxy.port
    with connect(proxy) as existing:
        round_trip(existing)
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        assert round_trip(existing) == b"ping"  # Established connections are untouched.

        proxy.heal()
        assert proxy.port == port
        with connect(proxy) as fresh:
            assert round_trip(fresh) == b"ping"


def test_upstream_down_fails_the_client_connection() -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        # The proxy can reset the client before the client's connect() has even returned, so
        # the reset may surface there rather than in recv().
        try:
            with connect(proxy) as client:
                data = client.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b""
        proxy.wait_until(lambda: proxy.connection_count == 0)
        assert proxy.accepted_total == 1
    assert proxy.errors == []


def test_stop_closes_connections_and_control_calls_then_fail(echo: _EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    with proxy, connect(proxy) as client:
        round_trip(client)
        proxy.stop()
        assert client.recv(1) == b""
    with pytest.raises(RuntimeError):
        proxy.blackhole()
    proxy.stop()  # Idempotent.
    assert proxy.errors == []
