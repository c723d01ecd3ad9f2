"""Kernel WireGuard through generic netlink (pyroute2), the preferred data plane (ADR-003).

No `ip` or `wg` subprocesses: the link is created with rtnetlink, the device is read and changed with
WireGuard's generic netlink family. A device dump comes in several messages when it is large, and one peer's
allowed IPs may continue in the next message; every chunk is merged (readers that keep only the first message
see ~90 peers of a large device).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from warren_mesh.identity.keys import NodeKey
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec, PeerStats
from warren_mesh.wireguard import link
from warren_mesh.wireguard.backend import BackendError


def _key_text(value: Any) -> str | None:
    """pyroute2 hands keys back as an nla (with a base64 'value'), as bytes, or as text, by version."""
    if value is None:
        return None
    if not isinstance(value, bytes | str):
        value = value.get("value") if hasattr(value, "get") else value
    if isinstance(value, bytes):
        value = value.decode()
    text = str(value)
    return text if len(base64.b64decode(text)) == 32 else None


class _PeerAccumulator:
    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self.endpoint: str | None = None
        self.allowed: list[str] = []
        self.keepalive = 0
        self.rx = self.tx = 0
        self.handshake = 0.0

    def merge(self, nla: Any) -> None:
        endpoint = nla.get_attr("WGPEER_A_ENDPOINT")
        if endpoint is not None and endpoint.get("addr") and endpoint.get("port"):
            host = str(endpoint["addr"])
            self.endpoint = f"[{host}]:{endpoint['port']}" if ":" in host else f"{host}:{endpoint['port']}"
        keepalive = nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
        if keepalive is not None:
            self.keepalive = int(keepalive)
        rx, tx = nla.get_attr("WGPEER_A_RX_BYTES"), nla.get_attr("WGPEER_A_TX_BYTES")
        self.rx = int(rx) if rx is not None else self.rx
        self.tx = int(tx) if tx is not None else self.tx
        stamp = nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
        if stamp is not None:
            self.handshake = int(stamp.get("tv_sec", 0)) + int(stamp.get("tv_nsec", 0)) / 1e9
        for allowed in nla.get_attr("WGPEER_A_ALLOWEDIPS") or []:
            address = allowed.get("addr")
            if address:
                self.allowed.append(str(address))


class KernelBackend:
    def __init__(self, interface: str) -> None:
        self._interface = interface
        self._ipr = IPRoute()
        self._link = link.InterfaceLink(self._ipr, interface)
        self._wg = WireGuard()
        self.ensure_device()

    @property
    def name(self) -> str:
        return "kernel"

    @property
    def version(self) -> str:
        try:
            return f"kernel module {Path('/sys/module/wireguard/version').read_text().strip()}"
        except OSError:
            return "kernel module"

    @property
    def interface_name(self) -> str:
        return self._interface

    def ensure_device(self) -> bool:
        """Create the WireGuard link if it is missing; True when it had to."""
        if self._link.read() is not None:
            return False
        try:
            self._ipr.link("add", ifname=self._interface, kind="wireguard")
        except NetlinkError as exc:
            raise BackendError(f"cannot create WireGuard link {self._interface}: {exc}") from None
        return True

    def check(self) -> bool:
        # A kernel device only disappears if someone deletes it; recreate it and have it configured again.
        return self.ensure_device()

    def read(self) -> DeviceState:
        try:
            messages = self._wg.info(self._interface)
        except NetlinkError as exc:
            raise BackendError(f"reading WireGuard device {self._interface} failed: {exc}") from None
        private: str | None = None
        listen_port = fwmark = 0
        peers: dict[str, _PeerAccumulator] = {}
        for message in messages:
            private = _key_text(message.get_attr("WGDEVICE_A_PRIVATE_KEY")) or private
            port = message.get_attr("WGDEVICE_A_LISTEN_PORT")
            listen_port = int(port) if port else listen_port
            mark = message.get_attr("WGDEVICE_A_FWMARK")
            fwmark = int(mark) if mark else fwmark
            for nla in message.get_attr("WGDEVICE_A_PEERS") or []:
                key = _key_text(nla.get_attr("WGPEER_A_PUBLIC_KEY"))
                if key is not None:
                    peers.setdefault(key, _PeerAccumulator(key)).merge(nla)
        state = self._link.read()
        interface = None
        if state is not None and state.addresses and state.up and listen_port:
            interface = InterfaceSpec(state.addresses, listen_port, state.mtu, fwmark)
        public = NodeKey.from_private_bytes(base64.b64decode(private)).public_key if private else None
        return DeviceState(
            public,
            interface,
            {k: PeerSpec(k, p.endpoint, tuple(sorted(p.allowed)), p.keepalive) for k, p in peers.items()},
            {k: PeerStats(p.rx, p.tx, p.handshake) for k, p in peers.items()},
            self._link.read_routes() if state is not None else frozenset(),
        )

    def _set(self, what: str, **kwargs: Any) -> None:
        try:
            self._wg.set(self._interface, **kwargs)
        except (NetlinkError, ValueError) as exc:
            raise BackendError(f"{what} on {self._interface} failed: {exc}") from None

    def set_private_key(self, key: NodeKey) -> None:
        self._set("set private key", private_key=key.private_base64())

    def configure_interface(self, spec: InterfaceSpec) -> None:
        self._set("set listen port and fwmark", listen_port=spec.listen_port, fwmark=spec.fwmark)
        self._link.configure(addresses=spec.addresses, mtu=spec.mtu)

    def set_peer(self, spec: PeerSpec, *, adding: tuple[str, ...] | None = None) -> None:
        allowed = spec.allowed_ips if adding is None else adding
        self._link.refuse_unroutable(allowed)
        peer: dict[str, Any] = {
            "public_key": spec.public_key,
            "persistent_keepalive": spec.persistent_keepalive,
            "replace_allowed_ips": adding is None,  # without it, the listed allowed IPs are added to the peer's
        }
        if allowed:
            peer["allowed_ips"] = list(allowed)
        if spec.endpoint is not None:
            endpoint = Endpoint.parse(spec.endpoint)
            peer["endpoint_addr"], peer["endpoint_port"] = str(endpoint.host), endpoint.port
        self._set(f"set peer {spec.public_key[:10]}", peer=peer)

    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        adding = adding or {}
        for spec in specs:  # one netlink request each: pyroute2 sets one peer per call
            self.set_peer(spec, adding=adding.get(spec.public_key))

    def remove_peer(self, spec: PeerSpec) -> None:
        self._set(f"remove peer {spec.public_key[:10]}", peer={"public_key": spec.public_key, "remove": True})

    def add_route(self, network: str) -> None:
        self._link.add_route(network)

    def remove_route(self, network: str) -> None:
        self._link.remove_route(network)

    def close(self, *, remove_device: bool) -> None:
        if remove_device:
            self._link.delete()
        self._wg.close()
        self._ipr.close()
