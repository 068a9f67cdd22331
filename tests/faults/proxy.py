"""A fault-injecting TCP proxy for the relay's integration and fault tests.

Why pure Python: the test machines have no toxiproxy, tc or iptables, and every fault the relay
must survive (a slow link, a reset, a silent partition, a refused connect) can be produced at the
socket layer between the relay and PostgreSQL or RabbitMQ.

Why one thread and a selector: the loop thread owns every socket, so a fault is applied at one
point in the byte stream (no byte slips through after `blackhole()` returns) and closing a socket
never races with a `recv` in another thread. Calls from the test thread are shipped to the loop as
commands, and each returns only after the loop has applied it, so tests synchronise on the proxy
instead of sleeping.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_RECV_SIZE: Final = 65536
# Stop reading from a side once this much waits for the other side: a slow or delayed peer then
# pushes back on the sender through TCP instead of growing the proxy's memory.
_MAX_BUFFERED: Final = 1 << 20
# Bounds on how long a test thread waits for the loop; a stuck loop must fail a test, not hang it.
_COMMAND_TIMEOUT: Final = 5.0
_JOIN_TIMEOUT: Final = 5.0
# SO_LINGER on with a zero timeout: close() discards unsent data and sends RST instead of FIN.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# Selector data for the two sockets that are not part of a proxied connection.
_LISTEN: Final = "listen"
_WAKE: Final = "wake"
_CONNECT_PENDING: Final = frozenset({0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN})


def _abort(sock: socket.socket) -> None:
    """Close `sock` with a TCP RST, as a crashed peer or a middlebox reset would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # Already dead; close() below is all that is left to do.
    finally:
        sock.close()


def _close_gracefully(sock: socket.socket) -> None:
    """Close `sock` with a FIN.

    Unread input is drained first: Linux answers close() on a socket with unread data with RST,
    which would turn an intended graceful close into a reset.
    """
    try:
        for _ in range(64):
            if not sock.recv(_RECV_SIZE):
                break
    except OSError:
        pass  # Nothing (more) to read, or not connected: either way, close now.
    finally:
        sock.close()


def _no_delay(sock: socket.socket) -> None:
    """Disable Nagle: the proxy must add only the latency it is told to add."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(eq=False)
class _Flow:
    """One direction of a proxied connection: bytes read from one side, not yet written on.

    Chunks keep the time they were read, so latency is applied per chunk while byte order is
    preserved (a chunk is never sent before the ones read earlier).
    """

    chunks: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    buffered: int = 0
    eof: bool = False  # The source side will send nothing more (FIN, RST or error).
    failed: bool = False  # The source side ended by RST or error: pass on a reset, not a FIN.
    shut: bool = False  # The FIN has been passed on to the destination side.
    blocked: bool = False  # The destination's send buffer is full; wait until it is writable.

    def push(self, stamp: float, data: bytes) -> None:
        self.chunks.append((stamp, data))
        self.buffered += len(data)

    def drop(self) -> None:
        self.chunks.clear()
        self.buffered = 0


@dataclass(eq=False)
class _Pair:
    """A client connection and the upstream connection opened for it."""

    client: socket.socket
    upstream: socket.socket
    peer: str
    connecting: bool = True
    closed: bool = False
    up: _Flow = field(default_factory=_Flow)  # client -> upstream
    down: _Flow = field(default_factory=_Flow)  # upstream -> client
    masks: dict[socket.socket, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Command:
    """A control call waiting for the loop thread; `done` is set once it has been applied."""

    fn: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class FaultProxy:
    """A TCP proxy from `listen_host:port` to `upstream_host:upstream_port` with injectable faults.

    Every control method is thread-safe and returns only after the loop thread has applied it:
    `set_latency`, `reset_all`, `close_all`, `blackhole`, `refuse` and `heal`. Unexpected
    exceptions in the loop are logged and appended to `errors`, which tests should assert empty.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.errors: list[BaseException] = []
        self._port = listen_port
        self._lock = threading.Lock()
        self._state_changed = threading.Condition()
        self._commands: collections.deque[_Command] = collections.deque()
        self._running = False
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._listen_family = socket.AF_INET
        self._upstream_family = socket.AF_INET
        self._upstream_addr: Any = None
        self._pairs: set[_Pair] = set()
        self._stopping = False
        self._latency = 0.0
        self._blackhole = False
        self._accepted_total = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._bytes_from_clients = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Bind, then start the loop thread.

        Binding happens here, in the caller's thread, so `port` is known and a bind error is
        raised to the caller. A restarted proxy binds the port it had before, so its address
        stays stable.
        """
        if self._thread is not None:
            raise RuntimeError("FaultProxy is already running")
        family, _, _, _, sockaddr = socket.getaddrinfo(
            self.upstream_host, self.upstream_port, type=socket.SOCK_STREAM
        )[0]
        self._upstream_family, self._upstream_addr = family, sockaddr
        self._listen_family = socket.getaddrinfo(
            self.listen_host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        selector = selectors.DefaultSelector()
        wake_r, wake_w = socket.socketpair()
        try:
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            listener = self._listen()
        except BaseException:
            selector.close()
            wake_r.close()
            wake_w.close()
            raise
        selector.register(wake_r, selectors.EVENT_READ, _WAKE)
        selector.register(listener, selectors.EVENT_READ, _LISTEN)
        self._selector, self._listener = selector, listener
        self._wake_r, self._wake_w = wake_r, wake_w
        self._pairs = set()
        self._stopping = False
        self._latency = 0.0
        self._blackhole = False
        with self._lock:
            self._running = True
        self._thread = threading.Thread(
            target=self._run, name=f"FaultProxy-{self._port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close every socket and join the loop thread (bounded). Safe to call twice."""
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._call(self._request_stop)
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            error = RuntimeError(f"FaultProxy loop did not stop within {_JOIN_TIMEOUT}s")
            _log.error("%s", error)
            self.errors.append(error)
        self._thread = None
        if self._wake_w is not None:
            self._wake_w.close()
            self._wake_w = None

    # -- state -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (the same one across `refuse` and restarts)."""
        if self._port == 0:
            raise RuntimeError("FaultProxy has not been started, so it has no port yet")
        return self._port

    @property
    def address(self) -> str:
        """`host:port` to hand to the client under test in place of the real service."""
        return f"{self.listen_host}:{self.port}"

    @property
    def connection_count(self) -> int:
        """Proxied connections currently open (including those still connecting upstream)."""
        return len(self._pairs)

    @property
    def accepted_total(self) -> int:
        """Client connections accepted since start: tells a test that a client reconnected."""
        return self._accepted_total

    @property
    def bytes_up(self) -> int:
        """Bytes written to the upstream side (dropped bytes are not counted)."""
        return self._bytes_up

    @property
    def bytes_from_clients(self) -> int:
        """Bytes received from clients, forwarded or not (a blackhole drops what it receives):
        tells a test that a client sent something into a blackhole."""
        return self._bytes_from_clients

    @property
    def bytes_down(self) -> int:
        """Bytes written to the client side (dropped bytes are not counted)."""
        return self._bytes_down

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until `predicate()` is true, re-checking each time the loop has done work.

        For conditions the client side cannot observe, such as "the proxy has accepted the
        connection" (`lambda: proxy.connection_count == 1`), without sleeping. The predicate
        runs in the caller's thread, so it should only read the counters above.
        """
        deadline = time.monotonic() + timeout
        with self._state_changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s")
                self._state_changed.wait(remaining)

    # -- faults ------------------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk, in both directions, by `seconds` (a round trip gets twice that).

        Applies at once to bytes already waiting, so lowering it releases them early.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency must be a finite number >= 0, not {seconds!r}")

        def apply() -> None:
            self._latency = float(seconds)

        self._call(apply)

    def reset_all(self) -> None:
        """Reset every current connection with RST on both sides, as a crashed middlebox would.

        Connections the kernel has completed but the proxy not yet accepted are included.
        """

        def apply() -> None:
            self._accept_ready()
            for pair in list(self._pairs):
                self._drop(pair, reset=True)

        self._call(apply)

    def close_all(self) -> None:
        """Close every current connection with FIN on both sides, as a restarting server would.

        Connections not yet accepted are included; bytes still waiting in the proxy are dropped.
        """

        def apply() -> None:
            self._accept_ready()
            for pair in list(self._pairs):
                self._drop(pair, reset=False)

        self._call(apply)

    def blackhole(self, on: bool = True) -> None:
        """Silently drop all bytes in both directions while on, like a network partition.

        Connections stay open and new ones are accepted and connected upstream, but nothing
        flows; bytes waiting in the proxy are dropped too. A FIN or reset that arrives while on
        is passed on only after the blackhole is lifted. Dropped bytes are lost for good, so a
        stream that crossed the blackhole has a gap.
        """

        def apply() -> None:
            self._blackhole = on
            if on:
                for pair in self._pairs:
                    pair.up.drop()
                    pair.down.drop()

        self._call(apply)

    def refuse(self, on: bool = True) -> None:
        """While on, close the listening socket so new connects fail with ECONNREFUSED.

        Existing connections are untouched. Switching off listens again on the same port.
        """

        def apply() -> None:
            self._set_refusing(on)

        self._call(apply)

    def heal(self) -> None:
        """Undo every standing fault: no latency, no blackhole, listening again."""

        def apply() -> None:
            self._latency = 0.0
            self._blackhole = False
            self._set_refusing(False)

        self._call(apply)

    # -- control plumbing (any thread) -------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the loop thread and return its result once it has run there."""
        result: list[_T] = []

        def run() -> None:
            result.append(fn())

        if threading.current_thread() is self._thread:
            run()
            return result[0]
        command = _Command(run)
        with self._lock:
            if not self._running:
                raise RuntimeError("FaultProxy is not running")
            self._commands.append(command)
        self._wake()
        if not command.done.wait(_COMMAND_TIMEOUT):
            raise TimeoutError(f"FaultProxy loop did not answer within {_COMMAND_TIMEOUT}s")
        if command.error is not None:
            raise command.error
        return result[0]

    def _wake(self) -> None:
        wake_w = self._wake_w
        if wake_w is None:
            return
        # Full buffer: a wake-up is already pending. Closed: the loop is gone, and the command
        # has been failed or will time out.
        with contextlib.suppress(OSError):
            wake_w.send(b"\0")

    # -- loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping:
                for key, mask in selector.select(self._next_timeout()):
                    self._dispatch(key, mask)
                self._pump_all()
                with self._state_changed:
                    self._state_changed.notify_all()
        except Exception as exc:
            self._record(exc, "FaultProxy loop crashed")
        finally:
            self._shut_down()

    def _request_stop(self) -> None:
        self._stopping = True

    def _shut_down(self) -> None:
        with self._lock:
            self._running = False
            pending = list(self._commands)
            self._commands.clear()
        for command in pending:
            command.error = RuntimeError("FaultProxy stopped")
            command.done.set()
        for pair in list(self._pairs):
            self._drop(pair, reset=False)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._wake_r is not None:
            self._wake_r.close()
            self._wake_r = None
        with self._state_changed:
            self._state_changed.notify_all()

    def _record(self, exc: BaseException, what: str) -> None:
        _log.error("%s: %r", what, exc, exc_info=exc)
        self.errors.append(exc)

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == _WAKE:
            self._run_commands()
            return
        if key.data == _LISTEN:
            if key.fileobj is self._listener:
                try:
                    self._accept_ready()
                except Exception as exc:
                    self._record(exc, "accepting failed")
            return
        pair, is_client = key.data
        if pair.closed:
            return  # Dropped earlier in this batch of events.
        try:
            if is_client:
                self._on_client(pair, mask)
            else:
                self._on_upstream(pair, mask)
        except Exception as exc:
            self._record(exc, f"handling {pair.peer} failed")
            self._drop(pair, reset=True)

    def _run_commands(self) -> None:
        wake_r = self._wake_r
        assert wake_r is not None
        with contextlib.suppress(BlockingIOError):
            while wake_r.recv(4096):
                pass
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                command.fn()
            except Exception as exc:  # Goes back to the caller, who made the request.
                command.error = exc
            finally:
                command.done.set()

    def _listen(self) -> socket.socket:
        """Listen on `listen_host:_port`.

        SO_REUSEADDR lets `refuse(False)` take the same port back while connections accepted
        on it are still open.
        """
        sock = socket.socket(self._listen_family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return sock

    def _set_refusing(self, on: bool) -> None:
        selector = self._selector
        assert selector is not None
        if on and self._listener is not None:
            selector.unregister(self._listener)
            self._listener.close()  # Connects still in the backlog are reset by the kernel.
            self._listener = None
        elif not on and self._listener is None:
            listener = self._listen()
            selector.register(listener, selectors.EVENT_READ, _LISTEN)
            self._listener = listener

    def _accept_ready(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(64):  # Bounded, so a connect storm cannot starve the other sockets.
            try:
                client, address = listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # The client gave up before we accepted it.
            self._open_pair(client, address)

    def _open_pair(self, client: socket.socket, address: Any) -> None:
        self._accepted_total += 1
        client.setblocking(False)
        _no_delay(client)
        try:
            upstream = socket.socket(self._upstream_family, socket.SOCK_STREAM)
        except OSError as exc:
            self._record(exc, "creating the upstream socket failed")
            _abort(client)
            return
        upstream.setblocking(False)
        _no_delay(upstream)
        pair = _Pair(client=client, upstream=upstream, peer=f"{address!r}")
        self._pairs.add(pair)
        result = upstream.connect_ex(self._upstream_addr)
        if result not in _CONNECT_PENDING:
            _log.info("upstream connect for %s failed: %s", pair.peer, os.strerror(result))
            self._drop(pair, reset=True)
            return
        pair.connecting = result != 0
        self._update_interest(pair)

    def _on_client(self, pair: _Pair, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._bytes_from_clients += self._receive(pair.client, pair.up)
        if mask & selectors.EVENT_WRITE:
            pair.down.blocked = False

    def _on_upstream(self, pair: _Pair, mask: int) -> None:
        if pair.connecting:
            error = pair.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                # The client must see the failure, as it would connecting directly.
                _log.info("upstream connect for %s failed: %s", pair.peer, os.strerror(error))
                self._drop(pair, reset=True)
            else:
                pair.connecting = False
            return
        if mask & selectors.EVENT_READ:
            self._receive(pair.upstream, pair.down)
        if mask & selectors.EVENT_WRITE:
            pair.up.blocked = False

    def _receive(self, source: socket.socket, flow: _Flow) -> int:
        """Read what `source` sent into `flow`; returns how many bytes were read."""
        try:
            data = source.recv(_RECV_SIZE)
        except BlockingIOError:
            return 0
        except OSError as exc:
            _log.debug("receive failed: %r", exc)
            flow.eof = flow.failed = True
            return 0
        if not data:
            flow.eof = True
        elif not self._blackhole:
            flow.push(time.monotonic(), data)
        return len(data)

    def _pump_all(self) -> None:
        now = time.monotonic()
        for pair in list(self._pairs):
            try:
                self._pump(pair, now)
            except Exception as exc:
                self._record(exc, f"forwarding for {pair.peer} failed")
                self._drop(pair, reset=True)

    def _pump(self, pair: _Pair, now: float) -> None:
        """Forward what is due, pass on EOFs and resets, then re-register interest."""
        if self._blackhole:
            pair.up.drop()
            pair.down.drop()
        else:
            if not pair.connecting and not self._forward(pair, pair.up, pair.upstream, now):
                return
            if not self._forward(pair, pair.down, pair.client, now):
                return
            if pair.up.shut and pair.down.shut:
                self._drop(pair, reset=False)
                return
        self._update_interest(pair)

    def _forward(self, pair: _Pair, flow: _Flow, dest: socket.socket, now: float) -> bool:
        """Send the chunks of `flow` that are due; False if that ended the pair."""
        while flow.chunks and not flow.blocked:
            stamp, data = flow.chunks[0]
            if stamp + self._latency > now:
                break
            try:
                sent = dest.send(data)
            except BlockingIOError:
                flow.blocked = True
                break
            except OSError as exc:
                _log.debug("send to %s failed: %r", pair.peer, exc)
                self._drop(pair, reset=True)
                return False
            flow.buffered -= sent
            if flow is pair.up:
                self._bytes_up += sent
            else:
                self._bytes_down += sent
            if sent < len(data):
                flow.chunks[0] = (stamp, data[sent:])
                flow.blocked = True
                break
            flow.chunks.popleft()
        if flow.eof and not flow.chunks and not flow.shut:
            if flow.failed:
                self._drop(pair, reset=True)
                return False
            try:
                dest.shutdown(socket.SHUT_WR)
            except OSError as exc:
                _log.debug("half-close towards %s failed: %r", pair.peer, exc)
                self._drop(pair, reset=True)
                return False
            flow.shut = True
        return True

    def _next_timeout(self) -> float | None:
        """Seconds until the earliest delayed chunk is due; None (wait for I/O) if none is."""
        if self._blackhole:
            return None
        due: float | None = None
        for pair in self._pairs:
            for flow in (pair.up, pair.down):
                if not flow.chunks or flow.blocked or (flow is pair.up and pair.connecting):
                    continue
                stamp = flow.chunks[0][0] + self._latency
                due = stamp if due is None else min(due, stamp)
        return None if due is None else max(0.0, due - time.monotonic())

    def _update_interest(self, pair: _Pair) -> None:
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        client_mask = 0
        if not pair.up.eof and pair.up.buffered < _MAX_BUFFERED:
            client_mask |= read
        if pair.down.blocked:
            client_mask |= write
        if pair.connecting:
            upstream_mask = write  # Writable means the connect finished, one way or the other.
        else:
            upstream_mask = 0
            if not pair.down.eof and pair.down.buffered < _MAX_BUFFERED:
                upstream_mask |= read
            if pair.up.blocked:
                upstream_mask |= write
        self._set_mask(pair, pair.client, client_mask, is_client=True)
        self._set_mask(pair, pair.upstream, upstream_mask, is_client=False)

    def _set_mask(self, pair: _Pair, sock: socket.socket, mask: int, *, is_client: bool) -> None:
        selector = self._selector
        assert selector is not None
        old = pair.masks.get(sock, 0)
        if mask == old:
            return
        if old == 0:
            selector.register(sock, mask, (pair, is_client))
        elif mask == 0:
            selector.unregister(sock)
        else:
            selector.modify(sock, mask, (pair, is_client))
        pair.masks[sock] = mask

    def _drop(self, pair: _Pair, *, reset: bool) -> None:
        """End both sides of `pair`, with RST if `reset`, else with FIN."""
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        for sock in (pair.client, pair.upstream):
            if pair.masks.get(sock, 0) and self._selector is not None:
                self._selector.unregister(sock)
            if reset:
                _abort(sock)
            else:
                _close_gracefully(sock)
        pair.masks.clear()
