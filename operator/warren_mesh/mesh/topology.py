"""The desired WireGuard device of one node, computed from the mesh view alone (pure: no I/O, no clock).

The same function serves the agent, ``warren-mesh status`` and the benchmarks. Conflicts are settled the same
way on every node, so the mesh stays symmetric: records are taken in order of their etcd create revision and a
record that collides with one taken before it (same public key, an address reserved for someone else, allowed
IPs overlapping another peer's) is left out. Overlaps matter because WireGuard routes by allowed IPs: a record
that claims another node's address would otherwise silently take its traffic.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

from warren_mesh.device import InterfaceSpec, PeerSpec
from warren_mesh.mesh.peers import Entry
from warren_mesh.model import (
    REASON_ADDRESS_OUTSIDE_CIDR,
    REASON_ADDRESS_TAKEN,
    REASON_DUPLICATE_PUBLIC_KEY,
    REASON_OVERLAPPING_ALLOWED_IPS,
    WIREGUARD_OVERHEAD,
    ExternalPeer,
    IPAddress,
    IPNetwork,
    MeshConfig,
    NodeRecord,
    Routes,
    host_network,
)


@dataclass(frozen=True, slots=True)
class LocalNode:
    name: str
    public_key: str
    overlay_ip: IPAddress
    allowed_ips: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Conflict:
    name: str  # the record left out
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Topology:
    interface: InterfaceSpec
    peers: Mapping[str, PeerSpec]  # by public key
    names: Mapping[str, str]  # public key -> node or peer name
    conflicts: tuple[Conflict, ...] = ()


class _NetworkClaims:
    """Networks taken so far, answering "does this overlap one of them?" in O(prefix lengths x log n)."""

    def __init__(self) -> None:
        self._starts: dict[tuple[int, int], list[int]] = {}  # (ip version, prefix length) -> sorted starts
        self._owner: dict[tuple[int, int, int], str] = {}

    def owner_of_overlap(self, version: int, first: int, last: int) -> str | None:
        for (claimed_version, prefixlen), starts in self._starts.items():
            if claimed_version != version:
                continue
            # Networks of one length never overlap each other; of those starting at or before `last`, only the
            # last one can reach back to `first`.
            i = bisect.bisect_right(starts, last) - 1
            if i >= 0 and starts[i] + (1 << ((32 if version == 4 else 128) - prefixlen)) - 1 >= first:
                return self._owner[(version, prefixlen, starts[i])]
        return None

    def add(self, version: int, prefixlen: int, first: int, owner: str) -> None:
        bisect.insort(self._starts.setdefault((version, prefixlen), []), first)
        self._owner[(version, prefixlen, first)] = owner


def device_mtu(config: MeshConfig, underlay_mtu: int) -> int:
    return config.mtu if config.mtu is not None else underlay_mtu - WIREGUARD_OVERHEAD


def build_topology(
    *,
    local: LocalNode,
    config: MeshConfig,
    nodes: Mapping[str, Entry[NodeRecord]],
    peers: Mapping[str, Entry[ExternalPeer]],
    ipam: Mapping[str, str],
    underlay_mtu: int,
    fwmark: int = 0,
) -> Topology:
    interface = InterfaceSpec(
        address=f"{local.overlay_ip}/{config.overlay_cidr.prefixlen}",
        listen_port=config.listen_port,
        mtu=device_mtu(config, underlay_mtu),
        fwmark=fwmark,
    )
    claims = _NetworkClaims()
    for version, prefixlen, first, _ in Routes.of((host_network(local.overlay_ip), *local.allowed_ips)).ranges:
        claims.add(version, prefixlen, first, local.name)
    keys: dict[str, str] = {local.public_key: local.name}
    specs: dict[str, PeerSpec] = {}
    conflicts: list[Conflict] = []

    candidates: list[tuple[int, str, Entry[NodeRecord] | Entry[ExternalPeer]]] = [
        (entry.create_revision, name, entry) for name, entry in nodes.items() if name != local.name
    ]
    candidates.extend((entry.create_revision, name, entry) for name, entry in peers.items())
    candidates.sort(key=lambda c: (c[0], c[1]))

    for _, name, entry in candidates:
        record = entry.record
        routes = record.routes
        if isinstance(record, NodeRecord):
            problem = _node_problem(record, config, ipam)
            endpoint: str | None = record.endpoint_text
            keepalive = config.persistent_keepalive
        else:
            problem = None
            endpoint = None if record.endpoint is None else str(record.endpoint)
            keepalive = (
                config.persistent_keepalive if record.persistent_keepalive is None else record.persistent_keepalive
            )
        if problem is None and record.public_key in keys:
            problem = Conflict(
                name, REASON_DUPLICATE_PUBLIC_KEY, f"{name} uses the public key of {keys[record.public_key]}"
            )
        if problem is None:
            for text, (version, _, first, last) in zip(routes.text, routes.ranges, strict=True):
                holder = claims.owner_of_overlap(version, first, last)
                if holder is not None:
                    problem = Conflict(
                        name, REASON_OVERLAPPING_ALLOWED_IPS, f"{name} claims {text}, which overlaps {holder}'s"
                    )
                    break
        if problem is not None:
            conflicts.append(problem)
            continue
        for version, prefixlen, first, _ in routes.ranges:
            claims.add(version, prefixlen, first, name)
        keys[record.public_key] = name
        specs[record.public_key] = PeerSpec(
            public_key=record.public_key,
            endpoint=endpoint,
            allowed_ips=routes.text,
            persistent_keepalive=keepalive,
        )
    del keys[local.public_key]
    return Topology(interface, specs, keys, tuple(conflicts))


def _node_problem(record: NodeRecord, config: MeshConfig, ipam: Mapping[str, str]) -> Conflict | None:
    if record.overlay_ip not in config.overlay_cidr:
        return Conflict(
            record.name,
            REASON_ADDRESS_OUTSIDE_CIDR,
            f"{record.name}'s address {record.overlay_ip} is outside the mesh network {config.overlay_cidr}",
        )
    owner = ipam.get(record.overlay_text)
    if owner is not None and owner != record.name:
        return Conflict(
            record.name,
            REASON_ADDRESS_TAKEN,
            f"{record.name} claims {record.overlay_ip}, reserved for {owner}",
        )
    return None
