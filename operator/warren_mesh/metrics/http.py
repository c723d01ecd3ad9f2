"""The agent's HTTP endpoints: ``/metrics`` for Prometheus and ``/healthz`` for probes, on the metrics address,
and ``/healthz`` alone on the health address (loopback in the manifests: what the kubelet's probes read).

Whoever reaches the metrics port (any pod on the node, unless it is bound to an address pods cannot reach) may be
hostile, and a liveness probe that stops answering gets the agent restarted. So:

- one thread serves every connection (non-blocking sockets and a selector), and one more renders ``/metrics``
  (prometheus-client's exposition is synchronous, and it reads the device): neither grows with the number of
  connections, and a slow rendering never holds up ``/healthz``;
- each port holds at most so many connections (``MAX_CONNECTIONS`` on the metrics port, ``MAX_HEALTH_CONNECTIONS``
  on the health port, which the metrics port's clients cannot take): one more evicts the oldest connection that
  has had ``GRACE`` s to send its request and has not; when there is none, new connections wait in the kernel's
  backlog. Descriptors stay bounded whatever is held open;
- a request (line and headers, at most ``MAX_REQUEST`` bytes) must arrive within ``REQUEST_TIMEOUT`` s of
  connecting and the answer be taken within ``SEND_TIMEOUT`` s; every answer closes its connection;
- ``/metrics`` is rendered at most once per ``RENDER_INTERVAL`` s, and every scrape gets a rendering started
  after it asked (the per-peer counters are read from the device then: a rate() over them must not see old
  values under new timestamps); scrapes that ask meanwhile share the next one. A flood of scrapes costs the agent
  one rendering a second, not one per scrape, and waits for it.

(The ``ThreadingHTTPServer`` this replaces started a thread per connection: 3,000 idle connections held 3,000
threads, and under a 1,024-descriptor limit the agent spent a core failing to accept while /healthz went silent.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from warren_mesh.values.netaddr import parse_listen_address

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 128
MAX_HEALTH_CONNECTIONS: Final = 16
MAX_REQUEST: Final = 8192  # bytes of request line and headers; a GET has no body
REQUEST_TIMEOUT: Final = 5.0
SEND_TIMEOUT: Final = 10.0
RENDER_INTERVAL: Final = 1.0
# How long a new connection is safe from eviction. A client's request is nearly always in the socket by the time
# it is accepted (it is sent once the handshake completes, and is read at once): this is for the one that is not.
GRACE: Final = 0.01
_BACKLOG: Final = 1024  # the kernel caps it at net.core.somaxconn (4096 on current kernels)
_PAUSE_WHEN_OUT_OF_DESCRIPTORS: Final = 0.1
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _Port:
    """One listening socket, its connections and their cap."""

    def __init__(self, address: str, cap: int, *, serves_metrics: bool) -> None:
        host, port = parse_listen_address(address)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(_BACKLOG)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.cap = cap
        self.serves_metrics = serves_metrics
        self.connections: dict[socket.socket, _Connection] = {}
        self.resume_at: float | None = None  # not listening until then (inf: until a connection ends)


class _Connection:
    __slots__ = ("answer", "asked_at", "head_only", "opened", "port", "request", "sock", "waiting_for_metrics")

    def __init__(self, sock: socket.socket, port: _Port, opened: float) -> None:
        self.sock = sock
        self.port = port
        self.opened = opened
        self.request = b""
        self.answer: memoryview | None = None  # set once the request is complete and answered
        self.waiting_for_metrics = False
        self.asked_at = 0.0  # when its request for /metrics was complete
        self.head_only = False


class MetricsServer:
    def __init__(
        self,
        address: str | None,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        *,
        health_address: str | None = None,
    ) -> None:
        """``address``: /metrics and /healthz; ``health_address``: /healthz only (None: not served)."""
        self._healthy = healthy
        self._render = lambda: generate_latest(registry)
        self._ports: list[_Port] = []
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        try:
            for where, cap, serves_metrics in (
                (address, MAX_CONNECTIONS, True),
                (health_address, MAX_HEALTH_CONNECTIONS, False),
            ):
                if where:
                    port = _Port(where, cap, serves_metrics=serves_metrics)
                    self._ports.append(port)
                    self._selector.register(port.sock, selectors.EVENT_READ, port)
        except OSError:
            self._release()
            raise
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")
        self._rendering: tuple[float, Future[bytes]] | None = None  # since when, and what it will give
        self._last_rendering = -RENDER_INTERVAL  # when the last one started
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        """The first port's number (the metrics port, if there is one)."""
        return int(self._ports[0].sock.getsockname()[1])

    @property
    def ports(self) -> list[int]:
        return [int(port.sock.getsockname()[1]) for port in self._ports]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join()
        self._renderer.shutdown(wait=False, cancel_futures=True)
        self._release()

    def _release(self) -> None:
        for port in self._ports:
            for conn in list(port.connections.values()):
                self._close(conn)
            port.sock.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_writer.send(b"\0")

    def _serve(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            for port in self._ports:
                if port.resume_at is not None and now >= port.resume_at:
                    self._listen(port)
            ready = self._selector.select(timeout=self._next_deadline(now))
            # The open connections first, then new ones: what was asked is answered before any eviction.
            for key, events in ready:
                if isinstance(key.data, _Connection):
                    if key.data.sock not in key.data.port.connections:
                        continue  # closed earlier in this round
                    if events & selectors.EVENT_READ:
                        self._read(key.data)
                    elif events & selectors.EVENT_WRITE:
                        self._send(key.data)
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_reader.recv(4096)
            for key, _ in ready:
                if isinstance(key.data, _Port):
                    self._accept(key.data)
            self._deliver_metrics()
            self._expire(time.monotonic())

    def _next_deadline(self, now: float) -> float:
        deadlines = [p.resume_at for p in self._ports if p.resume_at is not None and p.resume_at < math.inf]
        deadlines += [_deadline(c) for p in self._ports for c in p.connections.values()]
        if self._rendering is None and self._waiting_for_metrics():
            deadlines.append(self._next_rendering())
        return max(0.0, min(deadlines, default=now + 1.0) - now)

    def _listen(self, port: _Port) -> None:
        if port.resume_at is not None:
            port.resume_at = None
            self._selector.register(port.sock, selectors.EVENT_READ, port)

    def _pause(self, port: _Port, until: float) -> None:
        """Stop listening on ``port`` until then: a listener with connections waiting stays readable, and
        selecting on it while nothing can be accepted would spin."""
        if port.resume_at is None:
            self._selector.unregister(port.sock)
        port.resume_at = until

    def _accept(self, port: _Port) -> None:
        """Take new connections while there is a free slot or one to evict, reading each at once (its request
        is usually there already); otherwise leave them in the kernel's backlog."""
        while True:
            now = time.monotonic()
            if len(port.connections) >= port.cap and not self._evict_one(port, now):
                young = [c.opened for c in port.connections.values() if c.answer is None and not c.waiting_for_metrics]
                return self._pause(port, min(young) + GRACE if young else math.inf)
            try:
                sock, _ = port.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of descriptors (EMFILE, ENFILE) in this process
                log.warning("metrics endpoint: cannot accept (%s); pausing", exc)
                return self._pause(port, now + _PAUSE_WHEN_OUT_OF_DESCRIPTORS)
            sock.setblocking(False)
            conn = _Connection(sock, port, now)
            port.connections[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._read(conn)

    def _evict_one(self, port: _Port, now: float) -> bool:
        """Close the oldest connection that has had ``GRACE`` s to send its request and has not: the one most
        likely to be idle on purpose."""
        idle = [
            c
            for c in port.connections.values()
            if c.answer is None and not c.waiting_for_metrics and now - c.opened >= GRACE
        ]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.opened))
        return True

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._close(conn)
        conn.request += data
        if b"\r\n\r\n" not in conn.request and b"\n\n" not in conn.request:
            if len(conn.request) > MAX_REQUEST:
                self._answer(conn, 431, "text/plain", b"request header too large\n")
            return
        self._route(conn)

    def _route(self, conn: _Connection) -> None:
        line = conn.request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) != 3 or not line[2].startswith("HTTP/"):
            return self._answer(conn, 400, "text/plain", b"bad request\n")
        method, target = line[0], line[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return self._answer(conn, 405, "text/plain", b"only GET and HEAD\n")
        conn.head_only = method == "HEAD"
        if target == "/healthz":
            ok = self._healthy()
            return self._answer(conn, 200 if ok else 503, "text/plain", b"ok\n" if ok else b"not ready\n")
        if target != "/metrics" or not conn.port.serves_metrics:
            return self._answer(conn, 404, "text/plain", b"not found\n")
        conn.waiting_for_metrics = True
        conn.asked_at = time.monotonic()
        self._selector.unregister(conn.sock)  # nothing more to read; the answer registers it for writing
        self._deliver_metrics()

    def _deliver_metrics(self) -> None:
        """Answer the scrapes waiting for /metrics with the rendering that started after they asked, once it is
        done; start one when a scrape waits and none runs, ``RENDER_INTERVAL`` s after the last one started."""
        if self._rendering is not None and self._rendering[1].done():
            started, future = self._rendering
            self._rendering = None
            try:
                body: bytes | None = future.result()
            except Exception as exc:  # a collector failed: the scrape says so, the agent goes on
                log.warning("metrics endpoint: rendering failed: %s", exc)
                body = None
            for conn in self._waiting_for_metrics():
                if conn.asked_at <= started:
                    if body is None:
                        self._answer(conn, 500, "text/plain", b"rendering the metrics failed\n")
                    else:
                        self._answer(conn, 200, CONTENT_TYPE_LATEST, body)
        now = time.monotonic()
        if self._rendering is None and self._waiting_for_metrics() and now >= self._next_rendering():
            self._last_rendering = now
            future = self._renderer.submit(self._render)
            self._rendering = (now, future)
            future.add_done_callback(lambda _: self._wake())

    def _waiting_for_metrics(self) -> list[_Connection]:
        return [c for p in self._ports for c in p.connections.values() if c.waiting_for_metrics]

    def _next_rendering(self) -> float:
        return self._last_rendering + RENDER_INTERVAL

    def _answer(self, conn: _Connection, status: int, content_type: str, body: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        conn.answer = memoryview(head if conn.head_only else head + body)
        conn.opened = time.monotonic()  # the send timeout counts from here
        if conn.waiting_for_metrics:
            conn.waiting_for_metrics = False
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        else:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._send(conn)

    def _send(self, conn: _Connection) -> None:
        assert conn.answer is not None
        try:
            sent = conn.sock.send(conn.answer)
        except BlockingIOError:
            return
        except OSError:
            return self._close(conn)
        conn.answer = conn.answer[sent:]
        if not conn.answer:
            self._close(conn)

    def _expire(self, now: float) -> None:
        for port in self._ports:
            for conn in list(port.connections.values()):
                if now >= _deadline(conn):
                    self._close(conn)

    def _close(self, conn: _Connection) -> None:
        port = conn.port
        if port.connections.pop(conn.sock, None) is None:
            return
        if port.resume_at == math.inf:
            self._listen(port)  # a slot is free
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()


def _deadline(conn: _Connection) -> float:
    """When ``conn`` is closed if it has not ended by then. A scrape waiting for a rendering gets the send timeout
    on top of the request's: a stuck rendering (a device that does not answer) must not hold connections forever."""
    if conn.answer is not None:
        return conn.opened + SEND_TIMEOUT
    return conn.opened + REQUEST_TIMEOUT + (SEND_TIMEOUT if conn.waiting_for_metrics else 0.0)
