"""WireGuard in userspace: wireguard-go, supervised by the agent and driven through its UAPI socket.

The daemon outlives the agent on purpose (traffic keeps flowing while the agent restarts); a new agent adopts the
running daemon through its socket. If the daemon dies, ``check()`` starts a new one and reports the device lost,
and the next reconcile pass configures it again from scratch.

Where the agent cannot outlive-proof a child (in Kubernetes, a container's processes all die with it), another
process runs the daemon (``warren-mesh wireguard-go``, a pod of its own) and the backend only adopts it
(``start_daemon=False``): it waits for the daemon's socket, never starts or kills one, and a daemon that comes back
empty (restarted by its runner) is reported lost the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyroute2 import IPRoute

from warren_mesh.identity.keys import NodeKey, public_key_of
from warren_mesh.process import in_netns
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec
from warren_mesh.wireguard import link, uapi
from warren_mesh.wireguard.backend import BackendError

log = logging.getLogger(__name__)

_START_TIMEOUT = 5.0
_ADOPT_TIMEOUT = 30.0  # how long a new agent waits for a daemon run by someone else


# The first release with the TUN offloads (segmentation, checksums) of 2023: about 3x the throughput of older ones.
OFFLOAD_RELEASE = "0.0.20230223"


@functools.lru_cache(maxsize=4)
def wireguard_go_version(path: str) -> str:
    """``0.0.20230223`` from ``wireguard-go v0.0.20230223``; empty if the binary does not say."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    words = done.stdout.split()
    return words[1].removeprefix("v") if len(words) > 1 and words[0] == "wireguard-go" else ""


def lacks_offloads(version: str) -> bool:
    """Whether a wireguard-go of this version predates the offloads (unknown versions are given the benefit)."""
    return bool(version) and version.rsplit(".", maxsplit=1)[-1] < OFFLOAD_RELEASE.rsplit(".", maxsplit=1)[-1]


def find_wireguard_go() -> str:
    path = shutil.which("wireguard-go")
    if path is None:
        raise BackendError("wireguard-go is not installed; `apt-get install wireguard-go` (./hack/setup does it)")
    return path


class UserspaceBackend:
    def __init__(
        self,
        interface: str,
        *,
        netns: str | None = None,
        log_dir: Path | None = None,
        binary: str | None = None,
        start_daemon: bool = True,
    ) -> None:
        """``netns``: drive a device in that network namespace instead of the current one (tests, the lab).
        ``binary``: the wireguard-go to start (None: the one on PATH). ``start_daemon``: False where another process
        runs the daemon (``warren-mesh wireguard-go``): adopt it only."""
        self._interface = interface
        self._start_daemon = start_daemon
        self._binary = binary or find_wireguard_go()
        self._netns = netns
        self._socket = uapi.socket_path(interface)
        self._log_dir = log_dir
        self._ipr = IPRoute(netns=netns) if netns is not None else IPRoute()
        self._link = link.InterfaceLink(self._ipr, interface)
        # Daemons we started, kept only to reap them when they exit (they are supervised through the socket).
        self._children: list[subprocess.Popen[bytes]] = []
        # The listen port and fwmark the daemon was last seen with or given (None: not known). wireguard-go closes
        # and reopens its UDP sockets on every listen_port it is given, the same one too: a datagram arriving
        # meanwhile is lost (a mesh gaining IPv6, which changes only the interface's addresses, lost one so).
        self._sockets: tuple[int, int] | None = None
        self.ensure_running()

    @property
    def name(self) -> str:
        return "userspace"

    @property
    def version(self) -> str:
        return f"wireguard-go {wireguard_go_version(self._binary)}".rstrip()

    @property
    def interface_name(self) -> str:
        return self._interface

    # --- the daemon -------------------------------------------------------------------------------------------

    def _alive(self) -> bool:
        try:
            uapi.get(self._socket, timeout=1.0)
        except uapi.UapiError:
            return False
        return self._link.read() is not None

    def daemon_pid(self) -> int | None:
        """The pid of the wireguard-go serving our socket (from the socket's peer credentials), if any."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(self._socket))
            except OSError:
                return None
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return int(pid) or None

    def ensure_running(self) -> bool:
        """Start wireguard-go unless a live one already serves the interface; True if one was started.

        It runs in the foreground (``-f``) so that it creates its socket itself: the socket's peer credentials then
        name the daemon, which is how a restarted agent finds (and, if wedged, replaces) a daemon it adopted.
        """
        if self._alive():
            return False
        self._sockets = None  # another daemon: nothing known of it
        if not self._start_daemon:
            return self._await_daemon(_ADOPT_TIMEOUT)
        wedged = self.daemon_pid()
        if wedged is not None:  # the socket accepts but the daemon does not answer: replace it
            with contextlib.suppress(ProcessLookupError):
                os.kill(wedged, signal.SIGKILL)
        # A stale socket or TUN link of a dead daemon would make the new one refuse to start.
        self._socket.unlink(missing_ok=True)
        if self._link.read() is not None:
            self._link.delete()
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", LOG_LEVEL="error")
        log_path = None if self._log_dir is None else self._log_dir / f"wireguard-go-{self._interface}.log"
        with open(log_path or os.devnull, "ab") as out:
            # Its own process group, so a Ctrl-C aimed at the agent cannot take the data plane down with it, but
            # not its own session: with the kernel's autogroup scheduling a new session is a new CPU-scheduling
            # group, and wireguard-go then moved ~20 % less traffic than the same daemon started from a shell
            # (measured with hack/throughput.py: mesh_vs_manual 0.79 with a session of its own).
            process = subprocess.Popen(
                [self._binary, "-f", self._interface],
                stdout=out,
                stderr=out,
                env=env,
                process_group=0,
                preexec_fn=in_netns(self._netns),  # noqa: PLW1509 (one setns call)
            )
        deadline = time.monotonic() + _START_TIMEOUT
        pause = 0.001  # it serves its socket ~10 ms after the fork: look often at first (a cold start waits for it)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BackendError(f"wireguard-go for {self._interface} exited at start (exit {process.returncode})")
            if self._socket.exists() and self._alive():
                log.info("started wireguard-go for %s (pid %d)", self._interface, process.pid)
                self._children.append(process)
                return True
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        process.kill()
        process.wait()
        raise BackendError(f"wireguard-go for {self._interface} did not open {self._socket} in {_START_TIMEOUT} s")

    def _await_daemon(self, timeout: float) -> bool:
        """Wait for the daemon someone else runs; True once it serves the socket."""
        deadline = time.monotonic() + timeout
        while not self._alive():
            if time.monotonic() > deadline:
                raise BackendError(
                    f"no wireguard-go serves {self._interface} ({self._socket}); it is run by `warren-mesh "
                    "wireguard-go` (in Kubernetes the node's warren-mesh-wireguard pod), which is not running"
                )
            time.sleep(0.1)
        log.info("adopted the wireguard-go serving %s", self._interface)
        return True

    def check(self) -> bool:
        """Restart a dead daemon; True when it had to (the device is empty and must be configured again)."""
        if not self._start_daemon:
            # Its runner restarts it; a daemon without a key is a new one (ours always has a key once configured).
            try:
                return uapi.get(self._socket, timeout=1.0).private_key is None
            except (uapi.UapiError, OSError):
                self._await_daemon(1.0)
                return True
        self._children = [child for child in self._children if child.poll() is None]  # reap the dead
        if self.ensure_running():
            log.warning("wireguard-go for %s had died; restarted it", self._interface)
            return True
        return False

    # --- Backend ----------------------------------------------------------------------------------------------

    def read(self) -> DeviceState:
        try:
            device = uapi.get(self._socket)
        except uapi.UapiError as exc:
            raise BackendError(str(exc)) from None
        state = self._link.read()
        self._sockets = (device.listen_port, device.fwmark)
        interface = None
        if state is not None and state.addresses and state.up and device.listen_port:
            interface = InterfaceSpec(state.addresses, device.listen_port, state.mtu, device.fwmark)
        public = public_key_of(device.private_key) if device.private_key else None
        routes = self._link.read_routes() if state is not None else frozenset()
        return DeviceState(public, interface, device.peers, device.stats, routes)

    def _set(self, lines: list[str], what: str) -> None:
        try:
            uapi.set_lines(self._socket, lines, what=what)
        except uapi.UapiError as exc:
            raise BackendError(str(exc)) from None

    def set_private_key(self, key: NodeKey) -> None:
        self._set([f"private_key={key.private_bytes.hex()}"], "set private key")

    def configure_interface(self, spec: InterfaceSpec) -> None:
        known = self._sockets
        lines = []
        if known is None or known[0] != spec.listen_port:
            lines.append(f"listen_port={spec.listen_port}")
        if known is None or known[1] != spec.fwmark:
            lines.append(f"fwmark={spec.fwmark}")
        if lines:
            self._sockets = None  # until the daemon took them
            self._set(lines, "set listen port and fwmark")
            self._sockets = (spec.listen_port, spec.fwmark)
        self._link.configure(addresses=spec.addresses, mtu=spec.mtu)

    def set_peer(self, spec: PeerSpec, *, adding: tuple[str, ...] | None = None) -> None:
        self._link.refuse_unroutable(spec.allowed_ips if adding is None else adding)
        self._set(uapi.peer_lines(spec, adding), f"set peer {spec.public_key[:10]}")

    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """One UAPI transaction for all of them: wireguard-go takes ~0.4 ms per connection and transaction, which
        was most of a cold start with a thousand peers."""
        adding = adding or {}
        lines = []
        for spec in specs:
            added = adding.get(spec.public_key)
            self._link.refuse_unroutable(spec.allowed_ips if added is None else added)
            lines.extend(uapi.peer_lines(spec, added))
        self._set(lines, f"set {len(specs)} peers")

    def remove_peer(self, spec: PeerSpec) -> None:
        self._set(uapi.remove_peer_lines(spec.public_key), f"remove peer {spec.public_key[:10]}")

    def add_route(self, network: str) -> None:
        self._link.add_route(network)

    def remove_route(self, network: str) -> None:
        self._link.remove_route(network)

    def close(self, *, remove_device: bool) -> None:
        if remove_device:
            # Deleting the TUN link makes wireguard-go exit; wait for that so nothing outlives the removal.
            pid = self.daemon_pid()
            self._link.delete()
            for child in self._children:  # ours: wait reaps them
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            adopted = pid is not None and pid not in {child.pid for child in self._children}
            if adopted and pid is not None and not _wait_gone(pid, 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._socket.unlink(missing_ok=True)
        self._ipr.close()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False
