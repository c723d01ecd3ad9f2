"""A real etcd process of our own: the embedded default for the demo and lab, and the fixture of the tests.

It listens on loopback only, on free ports, with a data directory it owns and removes. Progress notifications
are turned on at a short interval so watchers can tell a quiet stream from a dead one. ``EtcdCluster`` runs three
(or more) such members as one cluster, for the tests that take members away (leader loss, quorum loss).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType

from pyroute2 import netns

from warren_mesh.identity import pki
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.process import in_netns, stop_child
from warren_mesh.store import roles
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.values.keyspace import DEFAULT_PREFIX, KeySchema


class EtcdServerError(RuntimeError):
    pass


def find_etcd() -> str:
    """The etcd binary: $WARREN_MESH_ETCD where set (hack/test's run against etcd 3.5), else the one installed."""
    chosen = os.environ.get("WARREN_MESH_ETCD")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise EtcdServerError(f"WARREN_MESH_ETCD={chosen} is not an executable etcd")
        return chosen
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EtcdServerError("etcd is not installed; `apt-get install etcd-server` (./hack/test does it for you)")


_handed_out: set[int] = set()


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A port free now on loopback, for a server about to listen on it. Taken below the kernel's ephemeral range:
    a port the kernel handed out (bind to 0) is free again the moment it is closed, and the next outgoing
    connection may take it as its source port before the server binds it ("address already in use", seen when a
    3-member etcd started while other clients connected). Ports outside that range are never given to them."""
    ephemeral = _ephemeral_range()
    # 20000-29999: clear of the ports Kubernetes components and NodePorts use on a host (10250-10259, 30000+)
    candidates = [port for port in range(20000, 30000) if port not in ephemeral and port not in _handed_out]
    for port in random.sample(candidates, len(candidates)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)  # not twice to this process's servers
        return port
    raise EtcdServerError("no free port on loopback below the ephemeral range")


class EtcdServer:
    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        progress_interval: str = "1s",
        host: str = "127.0.0.1",
        also_on: tuple[str, ...] = (),
        netns: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        outlive_parent: bool = False,
        name: str = "default",
        pki: Path | None = None,
    ) -> None:
        """``netns``: run inside that network namespace on ``host`` (the lab's hub); ``outlive_parent``: keep
        running after this process exits (the lab's etcd outlives `lab up`; a test's never does)."""
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="warren-etcd-")) if data_dir is None else data_dir
        self.host = host
        self._also_on = also_on  # more addresses to listen on (the lab hub's IPv6 one)
        self.netns = netns
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._outlive_parent = outlive_parent
        self._progress_interval = progress_interval
        self.name = name
        # With a PKI directory (warren_mesh.identity.pki): clients speak TLS and must show a certificate of its CA.
        self.pki = pki
        self.initial_cluster: str | None = None  # "name=peer-url,...": set by EtcdCluster; None: a cluster of one
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.pki else 'http'}://{self.host}:{self.client_port}"

    def _extra_urls(self) -> list[str]:
        scheme = "https" if self.pki else "http"
        return [
            f"{scheme}://[{h}]:{self.client_port}" if ":" in h else f"{scheme}://{h}:{self.client_port}"
            for h in self._also_on
        ]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> None:
        """Start etcd; with ``wait``, until it is healthy (a cluster member is healthy once there is a leader)."""
        if self._process is not None:
            return
        client = self.endpoint
        peer = self.peer_url
        args = [
            find_etcd(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={','.join([client, *self._extra_urls()])}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={peer}'}",
            f"--experimental-watch-progress-notify-interval={self._progress_interval}",
            "--log-level=warn",
        ]
        if self.pki is not None:
            args += [
                f"--cert-file={self.pki / 'etcd.pem'}",
                f"--key-file={self.pki / 'etcd-key.pem'}",
                f"--trusted-ca-file={self.pki / 'ca.pem'}",
                "--client-cert-auth",
            ]
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=in_netns(self.netns, tied_to_parent=self._tie_to_parent()),  # noqa: PLW1509
        )
        log.close()
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None:
                raise EtcdServerError("etcd is not running")
            if self._process.poll() is not None:
                self._process = None
                raise EtcdServerError(f"etcd exited at start; see {self.log_path}:\n{self._tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdServerError(f"etcd did not become healthy within {timeout} s; see {self.log_path}")

    def _tie_to_parent(self) -> bool:
        """Whether etcd should die with us. The kernel ties that to the *thread* that starts the child, so it is
        only safe from the main thread: started from a worker thread (asyncio.to_thread), etcd would die as soon
        as that worker exits. Such callers stop it themselves (close())."""
        return not self._outlive_parent and threading.current_thread() is threading.main_thread()

    def _healthy(self) -> bool:
        """GET /health over a socket made inside etcd's namespace (it may not be reachable from ours)."""
        try:
            with netns.create_socket(self.netns) as raw:
                raw.settimeout(1)
                raw.connect((self.host, self.client_port))
                sock = self._tls_context().wrap_socket(raw, server_hostname=self.host) if self.pki else raw
                sock.sendall(f"GET /health HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode())
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
        except OSError:
            return False
        body = answer.partition(b"\r\n\r\n")[2]
        try:
            return bool(json.loads(body).get("health") == "true")
        except ValueError:
            return False

    def client_tls(self, stem: str = "admin") -> EtcdTls | None:
        """The credentials ``stem.pem``/``stem-key.pem`` of this server's PKI (the admin's by default); None for
        a plain etcd."""
        if self.pki is None:
            return None
        return EtcdTls(self.pki / "ca.pem", self.pki / f"{stem}.pem", self.pki / f"{stem}-key.pem")

    def admin_store(self, *, call_timeout: float = 5.0) -> EtcdStore:
        """A client of this etcd acting as the admin (etcd's root, when it speaks TLS)."""
        return EtcdStore(self.endpoint, tls=self.client_tls(), call_timeout=call_timeout)

    def client_flags(self, stem: str = "admin") -> list[str]:
        """``--etcd-endpoints`` and, with TLS, the three ``--etcd-*-file`` flags of ``stem``'s credentials."""
        flags = [f"--etcd-endpoints={self.endpoint}"]
        tls = self.client_tls(stem)
        if tls is not None:
            flags += [f"--etcd-ca-file={tls.ca_file}", f"--etcd-cert-file={tls.cert_file}"]
            flags.append(f"--etcd-key-file={tls.key_file}")
        return flags

    def enable_auth(self, nodes: Iterable[str] = (), *, prefix: str = DEFAULT_PREFIX) -> None:
        """Turn etcd's auth on with the mesh's roles (store/roles.py): root, the operator, and ``nodes`` under
        ``prefix``. Blocking; works with or without a running event loop."""
        self._as_admin(lambda auth: roles.set_up(auth, KeySchema(prefix), nodes))

    def authorize_node(self, name: str, *, prefix: str = DEFAULT_PREFIX) -> EtcdTls:
        """A certificate for node ``name`` (made once) whose user may write that node's keys under ``prefix``;
        its credentials. Roles add up: one node name may be given several prefixes (tests keep apart by prefix)."""
        assert self.pki is not None, "a plain etcd has no users"
        if not (self.pki / f"{pki.node_user(name)}.pem").exists():
            pki.issue_node(self.pki, name)
        self._as_admin(lambda auth: roles.add_node(auth, KeySchema(prefix), name))
        tls = self.client_tls(pki.node_user(name))
        assert tls is not None
        return tls

    def _as_admin(self, action: Callable[[EtcdAuth], Awaitable[None]]) -> None:
        async def run() -> None:
            store = self.admin_store()
            try:
                await action(EtcdAuth(store))
            finally:
                await store.close()

        # In a thread of its own: callers may be inside an event loop (a test's scenario) or not.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()

    def _tls_context(self) -> ssl.SSLContext:
        """A client context with the PKI's admin certificate (etcd asks every client for one)."""
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        context.load_cert_chain(str(self.pki / "admin.pem"), str(self.pki / "admin-key.pem"))
        return context

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
        stop_child(process)

    def status(self) -> dict[str, str]:
        """etcd's maintenance status (its member id, the leader's id, ...) through its JSON gateway."""
        url = f"{self.endpoint}/v3/maintenance/status"  # our own etcd, on loopback
        request = urllib.request.Request(url, data=b"{}", method="POST")  # noqa: S310
        context = self._tls_context() if self.pki else None
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:  # noqa: S310
            status = json.loads(answer.read())
        return {"member": str(status["header"]["member_id"]), "leader": str(status["leader"])}

    def kill(self) -> None:
        """SIGKILL, as a machine that dies would leave it: no goodbye to its peers or clients."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports and data (clients resume where they were)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open but nothing answers, as with a hung server."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster; each can be stopped and started again."""

    def __init__(self, size: int = 3, *, progress_interval: str = "1s") -> None:
        self.members = [EtcdServer(progress_interval=progress_interval, name=f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    @property
    def endpoints(self) -> str:
        """Every member's client URL, comma-separated (what --etcd-endpoints takes)."""
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout: float = 30.0) -> None:
        for member in self.members:  # all at once: no member is healthy before a majority is up
            member.start(wait=False)
        for member in self.members:
            member.wait_healthy(timeout)

    def leader(self) -> EtcdServer:
        """The member that leads now (asked of the first member that answers)."""
        for member in self.members:
            if member.pid is None:
                continue
            try:
                status = member.status()
            except OSError:
                continue
            for candidate in self.members:
                if candidate.pid is not None and candidate.status()["member"] == status["leader"]:
                    return candidate
        raise EtcdServerError("no member of the cluster knows a leader")

    def close(self) -> None:
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
