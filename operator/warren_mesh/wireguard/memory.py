"""A WireGuard device kept in memory: for tests, the demo and simulating many nodes in one process.

It behaves like a device (peers keyed by public key, updates in place) and keeps a log of every operation, so a
test can prove that a change touched only the peers it had to.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from warren_mesh.identity.keys import NodeKey
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec


@dataclass(frozen=True, slots=True)
class Operation:
    action: str  # "private_key", "interface", "set_peer", "remove_peer", "add_route", "remove_route"
    target: str  # the peer's public key, the route's destination, or the interface name
    at: float  # time.time() when applied: comparable with a record's published_at


@dataclass
class MemoryBackend:
    interface_name: str = "wg-mesh"
    public_key: str | None = None
    interface: InterfaceSpec | None = None
    peers: dict[str, PeerSpec] = field(default_factory=dict)
    routes: set[str] = field(default_factory=set)
    # Bounded, so a long-running demo or benchmark does not grow without end.
    operations: deque[Operation] = field(default_factory=lambda: deque(maxlen=100_000))
    closed: bool = False

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return ""

    def read(self) -> DeviceState:
        return DeviceState(self.public_key, self.interface, dict(self.peers), routes=frozenset(self.routes))

    def set_private_key(self, key: NodeKey) -> None:
        self.public_key = key.public_key
        self._log("private_key", self.interface_name)

    def configure_interface(self, spec: InterfaceSpec) -> None:
        self.interface = spec
        self._log("interface", self.interface_name)

    def set_peer(self, spec: PeerSpec, *, adding: tuple[str, ...] | None = None) -> None:
        if adding is not None:
            # As a real device does: the networks are added to what the peer has, whatever the caller believed;
            # inserted in order (a gateway's peer holds thousands: sorting them all again was most of a join).
            had = self.peers.get(spec.public_key)
            allowed = list(had.allowed_ips) if had is not None else []
            for network in adding:
                at = bisect.bisect_left(allowed, network)
                if at == len(allowed) or allowed[at] != network:
                    allowed.insert(at, network)
            spec = dataclasses.replace(spec, allowed_ips=tuple(allowed))
        self.peers[spec.public_key] = spec
        self._log("set_peer", spec.public_key)

    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        adding = adding or {}
        for spec in specs:
            self.set_peer(spec, adding=adding.get(spec.public_key))

    def remove_peer(self, spec: PeerSpec) -> None:
        self.peers.pop(spec.public_key, None)
        self._log("remove_peer", spec.public_key)

    def add_route(self, network: str) -> None:
        self.routes.add(network)
        self._log("add_route", network)

    def remove_route(self, network: str) -> None:
        self.routes.discard(network)
        self._log("remove_route", network)

    def check(self) -> bool:
        return False

    def close(self, *, remove_device: bool) -> None:
        self.closed = True
        if remove_device:
            self.public_key, self.interface = None, None
            self.peers.clear()
            self.routes.clear()

    def _log(self, action: str, target: str) -> None:
        self.operations.append(Operation(action, target, time.time()))
