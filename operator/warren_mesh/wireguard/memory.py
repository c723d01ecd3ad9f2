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
from dataclasses import dataclass

from warren_mesh.identity.keys import NodeKey
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec
from warren_mesh.values.networks import Networks


@dataclass(frozen=True, slots=True)
class Operation:
    action: str  # "private_key", "interface", "set_peer", "remove_peer", "add_route", "remove_route"
    target: str  # the peer's public key, the route's destination, or the interface name
    at: float  # time.time() when applied: comparable with a record's published_at


class MemoryBackend:
    def __init__(self, interface_name: str = "wg-mesh", *, peers: Mapping[str, PeerSpec] | None = None) -> None:
        self.interface_name = interface_name
        self.public_key: str | None = None
        self.interface: InterfaceSpec | None = None
        self.routes: set[str] = set()
        # Bounded, so a long-running demo or benchmark does not grow without end.
        self.operations: deque[Operation] = deque(maxlen=100_000)
        self.closed = False
        self._peers: dict[str, PeerSpec] = dict(peers or {})
        # Peers given networks to add: the networks the device has for each, as a sorted list the next additions go
        # into, beside the spec stored for it. A gateway's peer carries thousands of networks: copying them twice
        # per join (to a list and back to a tuple) was the part of a simulated agent's cost that grew with the mesh,
        # and a real device's additions cost the agent nothing of the kind (the kernel or wireguard-go inserts).
        self._grown: dict[str, tuple[PeerSpec, list[str]]] = {}
        self._unchecked: set[str] = set()  # grown peers stored as the caller had them, not compared whole yet

    @property
    def peers(self) -> dict[str, PeerSpec]:
        """The peers as the device has them: what was added since the last look is compared whole here."""
        if self._unchecked:
            self._check_grown()
        return self._peers

    @peers.setter
    def peers(self, peers: Mapping[str, PeerSpec]) -> None:
        self._peers = dict(peers)
        self._grown.clear()
        self._unchecked.clear()

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
        key = spec.public_key
        if adding is None:
            self._grown.pop(key, None)
            self._unchecked.discard(key)
        else:
            # As a real device does: the networks are added to what the peer has, whatever the caller believed,
            # each inserted in order into the list kept for the peer (made once, not per addition).
            had = self._peers.get(key)
            grown = self._grown.get(key)
            if grown is not None and grown[0] is had:
                allowed = grown[1]
            else:
                allowed = list(had.allowed_ips) if had is not None else []
            for network in adding:
                at = bisect.bisect_left(allowed, network)
                if at == len(allowed) or allowed[at] != network:
                    allowed.insert(at, network)
            if len(allowed) == len(spec.allowed_ips) and all(_holds(spec.allowed_ips, n) for n in adding):
                # Very likely exactly what the device has now; compared whole when someone looks (``peers``).
                self._unchecked.add(key)
            else:
                spec = dataclasses.replace(spec, allowed_ips=tuple(allowed))
            self._grown[key] = (spec, allowed)
        self._peers[key] = spec
        self._log("set_peer", key)

    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        adding = adding or {}
        for spec in specs:
            self.set_peer(spec, adding=adding.get(spec.public_key))

    def remove_peer(self, spec: PeerSpec) -> None:
        self._peers.pop(spec.public_key, None)
        self._grown.pop(spec.public_key, None)
        self._unchecked.discard(spec.public_key)
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
            self.peers = {}
            self.routes.clear()

    def _log(self, action: str, target: str) -> None:
        self.operations.append(Operation(action, target, time.time()))

    def _check_grown(self) -> None:
        """The grown peers stored as the caller had them, made what the device's lists say where they differ."""
        for key in self._unchecked:
            stored, allowed = self._grown[key]
            networks = tuple(allowed)
            if stored.allowed_ips != networks:
                fixed = dataclasses.replace(stored, allowed_ips=networks)
                self._peers[key], self._grown[key] = fixed, (fixed, allowed)
        self._unchecked.clear()


def _holds(networks: Sequence[str], network: str) -> bool:
    """Whether sorted ``networks`` has ``network``."""
    if isinstance(networks, Networks):  # it finds its own (indexing one chunk by chunk would cost more)
        return network in networks
    at = bisect.bisect_left(networks, network)
    return at < len(networks) and networks[at] == network
