"""``warren-mesh showconf``: WireGuard configurations computed from etcd alone, by the topology code the agents run.

``peer NAME`` is a wg-quick file for an external member (a laptop, a macOS or Windows machine running the official
WireGuard app): its address in the mesh and one ``[Peer]`` per node, with what that node routes (its overlay
address and pod subnet). ``node NAME`` is what a node's WireGuard device should hold, to compare with
``wg showconf`` on that node. Both fold the mesh exactly as an agent does (``mesh.topology``), so a record an agent
would leave out is left out here too, and said so.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.topology import build_topology
from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.records import ExternalPeer
from warren_mesh.values.device import PeerSpec
from warren_mesh.values.netaddr import IPAddress

# Where a node's MTU depends on its underlay (mtu: auto), the file says nothing and wg-quick picks its own.
_UNKNOWN_MTU = 0


class ShowconfError(RuntimeError):
    """What was asked for is not in the mesh, or not usable as asked; the message says which."""


@dataclass(frozen=True, slots=True)
class Member:
    """A WireGuard configuration as a wg-quick file holds it."""

    addresses: tuple[str, ...]  # with their prefix, as wg-quick's Address takes them
    peers: tuple[PeerSpec, ...]
    names: dict[str, str]  # public key -> node name
    left_out: tuple[str, ...]  # "name: why", records the agents leave out
    private_key: str | None = None  # base64; None: the file says where it goes
    public_key: str = ""
    listen_port: int | None = None
    mtu: int = _UNKNOWN_MTU
    dns: tuple[str, ...] = ()

    def render(self) -> str:
        lines = ["[Interface]"]
        if self.private_key is not None:
            lines.append(f"PrivateKey = {self.private_key}")
        else:
            lines.append(f"# PrivateKey = the private key of {self.public_key} (never stored in the mesh)")
        if self.addresses:
            lines.append(f"Address = {', '.join(self.addresses)}")
        if self.listen_port is not None:
            lines.append(f"ListenPort = {self.listen_port}")
        if self.mtu != _UNKNOWN_MTU:
            lines.append(f"MTU = {self.mtu}")
        if self.dns:
            lines.append(f"DNS = {', '.join(self.dns)}")
        lines.extend(f"# left out, as every agent leaves it out: {why}" for why in self.left_out)
        for spec in self.peers:
            lines.append("")
            lines.append(f"# {self.names.get(spec.public_key, '?')}")
            lines.append("[Peer]")
            lines.append(f"PublicKey = {spec.public_key}")
            if spec.endpoint:
                lines.append(f"Endpoint = {spec.endpoint}")
            if spec.allowed_ips:  # none for a relayed node's own peer (docs/topology.md#relays)
                lines.append(f"AllowedIPs = {', '.join(spec.allowed_ips)}")
            if spec.persistent_keepalive:
                lines.append(f"PersistentKeepalive = {spec.persistent_keepalive}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "interface": {
                "public_key": self.public_key,
                "addresses": list(self.addresses),
                "listen_port": self.listen_port,
                "mtu": self.mtu or None,
                "dns": list(self.dns),
                "private_key_included": self.private_key is not None,
            },
            "peers": [
                {
                    "name": self.names.get(spec.public_key, ""),
                    "public_key": spec.public_key,
                    "endpoint": spec.endpoint,
                    "allowed_ips": list(spec.allowed_ips),
                    "persistent_keepalive": spec.persistent_keepalive,
                }
                for spec in self.peers
            ],
            "left_out": list(self.left_out),
        }

    def render_json(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def overlay_addresses(view: MeshReader, peer: ExternalPeer) -> tuple[IPAddress, ...]:
    """The peer's own addresses in the mesh networks: the single addresses of its allowed IPs inside them."""
    overlays = view.config.overlay_cidrs
    return tuple(
        network.network_address
        for network in peer.allowed_ips
        if network.prefixlen == network.max_prefixlen
        and any(network.version == o.version and network.network_address in o for o in overlays)
    )


def _fold(view: MeshReader, local: LocalNode) -> Topology:
    # The MTU is not the topology's to decide for a machine whose underlay we cannot see: see render().
    return build_topology(local=local, view=view, auto_mtu=_UNKNOWN_MTU)


def _left_out(topology: Topology, skip: str) -> tuple[str, ...]:
    return tuple(f"{c.name}: {c.message}" for c in topology.conflicts if c.name != skip)


def for_peer(view: MeshReader, name: str, *, private_key: NodeKey | None = None, dns: Sequence[str] = ()) -> Member:
    """The wg-quick file of external peer ``name``: one ``[Peer]`` per node the agents accept."""
    entry = view.peers.get(name)
    if entry is None:
        raise ShowconfError(f"no external peer {name!r} in the mesh (warren-mesh peer add {name}, or a MeshPeer)")
    peer = entry.record
    if private_key is not None and private_key.public_key != peer.public_key:
        raise ShowconfError(f"the private key given is not {name}'s (its public key is {peer.public_key})")
    addresses = overlay_addresses(view, peer)
    if not addresses:
        raise ShowconfError(
            f"peer {name} has no address of its own in the mesh networks "
            f"{', '.join(map(str, view.config.overlay_cidrs))}: give it one "
            "(a single address in allowedIPs) to make it a member"
        )
    local = LocalNode(name, peer.public_key, addresses)
    topology = _fold(view, local)
    # Only nodes: another external peer is not a router of the mesh, and usually has no endpoint to dial.
    nodes = set(view.nodes)
    keepalive = view.config.persistent_keepalive if peer.persistent_keepalive is None else peer.persistent_keepalive
    peers = tuple(
        _with_keepalive(spec, keepalive)
        for spec in sorted(topology.peers.values(), key=lambda s: topology.names[s.public_key])
        if topology.names[spec.public_key] in nodes
    )
    return Member(
        addresses=tuple(f"{a}/{a.max_prefixlen}" for a in addresses),
        peers=peers,
        names=dict(topology.names),
        left_out=_left_out(topology, name),
        private_key=private_key.private_base64() if private_key is not None else None,
        public_key=peer.public_key,
        mtu=view.config.mtu or _UNKNOWN_MTU,
        dns=tuple(dns),
    )


def _with_keepalive(spec: PeerSpec, keepalive: int) -> PeerSpec:
    """A member behind NAT (a laptop) keeps its mapping open itself: the nodes cannot dial it."""
    return PeerSpec(spec.public_key, spec.endpoint, spec.allowed_ips, keepalive)


def for_node(view: MeshReader, name: str) -> Member:
    """What node ``name``'s WireGuard device should hold, as its agent computes it (public parts only)."""
    entry = view.nodes.get(name)
    if entry is None:
        raise ShowconfError(f"no node {name!r} is registered in the mesh")
    record = entry.record
    local = LocalNode(
        name,
        record.public_key,
        record.overlay_ips,
        allowed_ips=record.allowed_ips,
        # Its agent also protects its underlay subnet and etcd's addresses, which etcd does not hold.
        protected=tuple(ipaddress.ip_network(f"{e.host}/{e.host.max_prefixlen}") for e in record.endpoints),
        underlay_families=tuple(e.host.version for e in record.endpoints),
    )
    topology = _fold(view, local)
    return Member(
        addresses=topology.interface.addresses,
        peers=tuple(sorted(topology.peers.values(), key=lambda s: topology.names[s.public_key])),
        names=dict(topology.names),
        left_out=_left_out(topology, name),
        public_key=record.public_key,
        listen_port=record.listen_port,
        mtu=view.config.mtu or _UNKNOWN_MTU,
    )
