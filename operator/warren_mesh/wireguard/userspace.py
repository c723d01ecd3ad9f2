"""WireGuard in userspace: wireguard-go, supervised by the agent and driven through its UAPI socket.

The daemon outlives the agent on purpose (traffic keeps flowing while the agent restarts); a new agent adopts the
running daemon through its socket. If the daemon dies, ``check()`` starts a new one and reports the device lost,
and the next reconcile pass configures it again from scratch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute

from warren_mesh.device import DeviceState, InterfaceSpec, PeerSpec
from warren_mesh.keys import NodeKey, public_key_of
from warren_mesh.process import in_netns
from warren_mesh.wireguard import link, uapi
from warren_mesh.wireguard.backend import BackendError

log = logging.getLogger(__name__)

_START_TIMEOUT = 5.0


def find_wireguard_go() -> str:
    path = shutil.which("wireguard-go")
    if path is None:
        raise BackendError("wireguard-go is not installed; `apt-get install wireguard-go` (./hack/setup does it)")
    return path


class UserspaceBackend:
    def __init__(self, interface: str, *, netns: str | None = None, log_dir: Path | None = None) -> None:
        """``netns``: drive a device in that network namespace instead of the current one (tests, the lab)."""
        self._interface = interface
        self._netns = netns
        self._socket = uapi.socket_path(interface)
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._ipr = IPRoute(netns=netns) if netns is not None else IPRoute()
        self.restarts = 0
        self.ensure_running()

    @property
    def name(self) -> str:
        return "userspace"

    @property
    def interface_name(self) -> str:
        return self._interface

    # --- the daemon -------------------------------------------------------------------------------------------

    def _alive(self) -> bool:
        try:
            uapi.get(self._socket, timeout=1.0)
        except uapi.UapiError:
            return False
        return link.read_link(self._ipr, self._interface) is not None

    def ensure_running(self) -> bool:
        """Start wireguard-go unless a live one already serves the interface; True if one was started."""
        if self._alive():
            return False
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        # A stale socket of a dead daemon would make the new one refuse to start.
        self._socket.unlink(missing_ok=True)
        stale = link.read_link(self._ipr, self._interface)
        if stale is not None:
            link.delete_link(self._ipr, self._interface)
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", LOG_LEVEL="error")
        log_path = None if self._log_dir is None else self._log_dir / f"wireguard-go-{self._interface}.log"
        with open(log_path or os.devnull, "ab") as out:
            # Own session: a Ctrl-C aimed at the agent must not take the data plane down with it.
            self._process = subprocess.Popen(
                [find_wireguard_go(), "-f", self._interface],
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
                preexec_fn=in_netns(self._netns),  # noqa: PLW1509 (one setns call)
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BackendError(f"wireguard-go for {self._interface} exited at start ({self._process.returncode})")
            if self._alive():
                log.info("started wireguard-go for %s (pid %d)", self._interface, self._process.pid)
                return True
            time.sleep(0.02)
        raise BackendError(f"wireguard-go for {self._interface} did not open {self._socket} in {_START_TIMEOUT} s")

    def check(self) -> bool:
        """Restart a dead daemon; True when it had to (the device is empty and must be configured again)."""
        if self.ensure_running():
            self.restarts += 1
            log.warning("wireguard-go for %s had died; restarted it", self._interface)
            return True
        return False

    # --- Backend ----------------------------------------------------------------------------------------------

    def read(self) -> DeviceState:
        try:
            device = uapi.get(self._socket)
        except uapi.UapiError as exc:
            raise BackendError(str(exc)) from None
        state = link.read_link(self._ipr, self._interface)
        interface = None
        if state is not None and state.address is not None and state.up and device.listen_port:
            interface = InterfaceSpec(state.address, device.listen_port, state.mtu)
        public = public_key_of(device.private_key) if device.private_key else None
        return DeviceState(public, interface, device.peers, device.stats)

    def _set(self, lines: list[str], what: str) -> None:
        try:
            uapi.set_lines(self._socket, lines, what=what)
        except uapi.UapiError as exc:
            raise BackendError(str(exc)) from None

    def set_private_key(self, key: NodeKey) -> None:
        self._set([f"private_key={key.private_bytes.hex()}"], "set private key")

    def configure_interface(self, spec: InterfaceSpec) -> None:
        self._set([f"listen_port={spec.listen_port}"], "set listen port")
        try:
            link.configure_link(self._ipr, self._interface, address=spec.address, mtu=spec.mtu)
        except link.LinkError as exc:
            raise BackendError(str(exc)) from None

    def set_peer(self, spec: PeerSpec) -> None:
        self._set(uapi.peer_lines(spec), f"set peer {spec.public_key[:10]}")
        try:
            link.add_routes(self._ipr, self._interface, spec.allowed_ips)
        except link.LinkError as exc:
            raise BackendError(str(exc)) from None

    def remove_peer(self, public_key: str) -> None:
        before = uapi.get(self._socket).peers.get(public_key)
        self._set(uapi.remove_peer_lines(public_key), f"remove peer {public_key[:10]}")
        if before is not None:
            try:
                link.remove_routes(self._ipr, self._interface, before.allowed_ips)
            except link.LinkError as exc:
                raise BackendError(str(exc)) from None

    def close(self, *, remove_device: bool) -> None:
        if remove_device:
            # Deleting the TUN link makes wireguard-go exit and remove its socket.
            link.delete_link(self._ipr, self._interface)
            if self._process is not None:
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._socket.unlink(missing_ok=True)
        self._ipr.close()
