"""The agent's /metrics and /healthz port against whoever can reach it (issue 28): a real agent process under
systemd's default limit of 1,024 descriptors, a real etcd, and a client that holds thousands of connections open,
dribbles its request, or scrapes as fast as it can. /healthz is what the DaemonSet's probes read (on the health
port, loopback, in the manifests): if it stops answering, anyone who reaches the port can get the agent
restarted."""

from __future__ import annotations

import http.client
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import AgentProcess
from warren_mesh.metrics.http import MAX_CONNECTIONS, REQUEST_TIMEOUT
from warren_mesh.testkit.etcd_server import EtcdServer, free_port
from warren_mesh.testkit.waiting import wait_for

DESCRIPTOR_LIMIT = 1024
HELD = 3000  # idle connections the attacker keeps open, reopening each one the agent closes
PROBES = 20


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _healthy(port: int) -> bool:
    try:
        return _get(port, "/healthz", timeout=1.0)[0] == 200
    except OSError:
        return False


def _proc(pid: int) -> tuple[int, int, int]:
    """Open descriptors, threads and resident KiB of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    descriptors = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return descriptors, int(status["Threads"]), int(status["VmRSS"].split()[0])


@contextmanager
def _agent(etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[tuple[AgentProcess, int, int]]:
    """A real agent; its metrics port and its health port."""
    port, health = free_port(), free_port()
    agent = AgentProcess(
        [
            "agent",
            "--backend=memory",
            "--node-name=m0",
            *etcd.client_flags(),
            f"--prefix={prefix}",
            "--endpoint=192.0.2.1:1",
            f"--key-file={tmp_path / 'm0.key'}",
            f"--metrics-address=127.0.0.1:{port}",
            f"--health-address=127.0.0.1:{health}",
        ],
        tmp_path / "agent.log",
        max_open_files=DESCRIPTOR_LIMIT,
    )
    agent.start()
    try:
        wait_for(lambda: _healthy(port) and _healthy(health), 60, "the agent's /healthz", agent.log)
        yield agent, port, health
    finally:
        agent.kill()


class _Holder:
    """Keeps ``count`` connections to ``port`` open and silent, reopening each one the other side closes."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="holder")

    def __enter__(self) -> _Holder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _open(self, selector: selectors.BaseSelector) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            for _ in range(self.count):
                self._open(selector)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        closed = sock.recv(1) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if closed:
                        selector.unregister(sock)
                        sock.close()
                        self._open(selector)
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()


@contextmanager
def _descriptors(count: int) -> Iterator[None]:
    """This process may open ``count`` descriptors (the attacker's side of the connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_healthz_answers_while_3000_idle_connections_are_held_under_1024_descriptors(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    with _agent(shared_etcd, prefix, tmp_path) as (agent, port, health), _descriptors(HELD + 1000):
        assert agent.process is not None
        pid = agent.process.pid
        before = _proc(pid)
        with _Holder(port, HELD) as holder:
            wait_for(lambda: holder.opened >= HELD, 30, "the attacker's connections")
            slowest = {health: 0.0, port: 0.0}
            most = before
            for probe in range(PROBES):
                # The metrics port's backlog is full of the attacker's connections: a new one gets in only after
                # SYN retries (1, 3, 7 s...), which is why the probes read the health port. It must still answer,
                # a few times, in the end.
                for probed in (health, port) if probe % 5 == 0 else (health,):
                    started = time.monotonic()
                    assert _get(probed, "/healthz", timeout=5.0 if probed == health else 20.0) == (200, b"ok\n")
                    slowest[probed] = max(slowest[probed], time.monotonic() - started)
                most = tuple(max(a, b) for a, b in zip(most, _proc(pid), strict=True))  # type: ignore[assignment]
                time.sleep(0.05)
            status, body = _get(port, "/metrics")
            assert status == 200 and b"warren_mesh_etcd_up 1.0" in body
            reopened = holder.opened - HELD
        print(
            f"{HELD} held ({reopened} reopened after the agent closed them): /healthz slowest "
            f"{slowest[health] * 1000:.0f} ms on the health port, {slowest[port] * 1000:.0f} ms on the metrics port;"
            f" agent descriptors {before[0]} -> at most {most[0]}, threads {before[1]} -> {most[1]},"
            f" RSS {before[2] // 1024} -> {most[2] // 1024} MiB"
        )
        assert most[0] <= before[0] + MAX_CONNECTIONS + 2, "descriptors grew past the connection cap"
        assert most[1] <= before[1] + 2, "threads grew with the connections"
        assert reopened > 0, "the agent closed none of the idle connections"
        assert slowest[health] < 1.0, "the health port waited behind the metrics port's connections"


def test_a_silent_or_dribbling_client_is_closed_after_the_request_timeout(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    with _agent(shared_etcd, prefix, tmp_path) as (_, port, _health):
        silent = socket.create_connection(("127.0.0.1", port))
        dribbling = socket.create_connection(("127.0.0.1", port))
        silent.settimeout(REQUEST_TIMEOUT + 5)
        dribbling.settimeout(1.0)
        try:
            started = time.monotonic()
            closed_at = None
            for char in b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 100:
                try:
                    dribbling.send(bytes([char]))
                    if dribbling.recv(1) == b"":
                        closed_at = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed_at = time.monotonic() - started
                    break
            assert closed_at is not None and closed_at < REQUEST_TIMEOUT + 2, closed_at
            assert silent.recv(1) == b""
            assert time.monotonic() - started < REQUEST_TIMEOUT + 5
        finally:
            silent.close()
            dribbling.close()


def test_healthz_answers_while_metrics_is_scraped_as_fast_as_it_can_be(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    with _agent(shared_etcd, prefix, tmp_path) as (_, port, _health):
        stop = threading.Event()
        scrapes = [0]

        def scrape() -> None:
            while not stop.is_set():
                try:
                    _get(port, "/metrics")
                    scrapes[0] += 1
                except OSError:
                    pass  # closed by the cap: the attacker tries again

        threads = [threading.Thread(target=scrape) for _ in range(16)]
        for thread in threads:
            thread.start()
        try:
            slowest = 0.0
            for _ in range(PROBES):
                started = time.monotonic()
                assert _get(port, "/healthz", timeout=5.0) == (200, b"ok\n")
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        print(f"{scrapes[0]} scrapes meanwhile; /healthz slowest {slowest * 1000:.0f} ms")
        assert scrapes[0] > PROBES
