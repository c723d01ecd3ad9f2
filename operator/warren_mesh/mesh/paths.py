"""Which peer carries each node's traffic: locations, gateways and relays (docs/topology.md). Pure: no I/O.

Nodes of one location form a full mesh over their own endpoints. A location reaches the others through its
gateway: the oldest of its candidates (mesh/candidacies.py) whose record is taken and has an external endpoint.
Gateways form a full mesh between locations, over their external endpoints. A node without a location is a
location of its own and its own gateway (Kilo's rule), so a mesh without locations is the full mesh it always
was. Two nodes that should talk directly (one location, or two gateways) and that both say they cannot (each
names the other in its record's ``unreachable``) go through a relay: a node direct with both that names neither,
by default a gateway; then each keeps the other as a peer without allowed IPs, so that a direct handshake that
works again shows, and the pair goes direct once either stops naming the other.

Every node computes this from the same records and candidacies, so the paths agree at both ends: whatever one
device sends through a peer, that peer's device takes from it. And every node's routes go to exactly one peer
of a device, so allowed IPs never overlap (tests/unit/test_paths.py checks both on random meshes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from warren_mesh.mesh.candidacies import Candidacy
from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.records import ExternalPeer, NodeRecord
from warren_mesh.values.device import PeerSpec


def location_id(record: NodeRecord) -> str:
    """The location ``record`` is in: its own, or (without one) a location of its own; never a label value."""
    return record.location if record.location is not None else f"node:{record.name}"


def elect_gateways(
    nodes: Mapping[str, NodeRecord],
    candidacies: Mapping[str, Candidacy],
    *,
    allowed: frozenset[str] | None = None,
) -> dict[str, str]:
    """Location -> its gateway. A node without a location is its own; of a named location's candidates standing
    for it, taken (``nodes``), with an external endpoint and ``allowed`` (None: any), the oldest."""
    best: dict[str, Candidacy] = {}
    for name, candidacy in candidacies.items():
        record = nodes.get(name)
        if record is None or record.location != candidacy.location or not record.external_endpoints:
            continue
        if allowed is not None and name not in allowed:
            continue
        held = best.get(candidacy.location)
        if held is None or candidacy < held:
            best[candidacy.location] = candidacy
    gateways = {location: candidacy.node for location, candidacy in best.items()}
    gateways.update((location_id(r), name) for name, r in nodes.items() if r.location is None)
    return gateways


@dataclass(frozen=True, slots=True)
class Paths:
    """How one node reaches every other."""

    local: str
    location: str  # its location (location_id: a location of its own when it names none)
    # node -> the peer of this node's device that carries its routes (the node itself when direct)
    carriers: Mapping[str, str]
    # nodes this one talks to directly, and whether over their external endpoints (other locations' gateways)
    direct: Mapping[str, bool]
    # node -> relay, for this node's pairs that go through one (the node stays a peer with no allowed IPs)
    relayed: Mapping[str, str] = field(default_factory=dict)
    # nodes this one has no path to: its location or theirs has no gateway
    unrouted: tuple[str, ...] = ()
    gateways: Mapping[str, str] = field(default_factory=dict)  # every location's gateway


def puts_paths_in_play(record: NodeRecord | ExternalPeer) -> bool:
    """Whether ``record`` puts paths in play: a node with a location, an external endpoint or unreachable peers."""
    return isinstance(record, NodeRecord) and bool(
        record.location is not None or record.external_endpoints or record.unreachable
    )


class PathSummary(NamedTuple):
    """What is said about one node's paths after every pass (its location's gateway, relayed pairs, nodes without
    a path): small, unlike ``Paths``, whose copies of every node's carrier cost a located mesh of 10,000 nodes a
    tenth of each join when they were made for every pass."""

    location: str
    gateway: str | None  # of this node's location
    relayed: Mapping[str, str]
    unrouted: tuple[str, ...]


class Routing:
    """The gateways and relayed pairs of one mesh, and from them each node's paths."""

    def __init__(
        self,
        nodes: Mapping[str, NodeRecord],
        candidacies: Mapping[str, Candidacy],
        *,
        gateways: frozenset[str] | None = None,
        relays: frozenset[str] | None = None,
    ) -> None:
        """``nodes``: the taken records (with this node's own); ``gateways``, ``relays``: the Mesh's choice of who
        may be a gateway or a relay (None: any that can; a relay then must be a gateway)."""
        self.nodes = nodes
        self.gateways = elect_gateways(nodes, candidacies, allowed=gateways)
        self._gateway_nodes = frozenset(self.gateways.values())
        self._relays_allowed = relays
        self.relays = self._relayed_pairs()

    def is_gateway(self, name: str) -> bool:
        return name in self._gateway_nodes

    def direct(self, a: str, b: str) -> bool:
        """Whether nodes ``a`` and ``b`` should talk directly: one location, or each its location's gateway."""
        ra, rb = self.nodes[a], self.nodes[b]
        if location_id(ra) == location_id(rb):
            return True
        return a in self._gateway_nodes and b in self._gateway_nodes

    def paths(self, local: str) -> Paths:
        """How ``local`` (a node of ``nodes``) reaches every other node of ``nodes``."""
        record = self.nodes[local]
        own = location_id(record)
        gateway = self.gateways.get(own)
        carriers: dict[str, str] = {}
        direct: dict[str, bool] = {}
        relayed: dict[str, str] = {}
        unrouted: list[str] = []
        for name, other in self.nodes.items():
            if name == local:
                continue
            there = location_id(other)
            if there == own or (local == gateway and name == self.gateways.get(there)):
                direct[name] = there != own
                relay = self.relays.get(_pair(local, name))
                if relay is None:
                    carriers[name] = name
                else:
                    carriers[name] = relayed[name] = relay
                continue
            remote = self.gateways.get(there)
            carrier = remote if local == gateway else gateway
            if carrier is None or remote is None:  # no gateway at either end: no path
                unrouted.append(name)
            else:
                carriers[name] = carrier
        # A remote location's traffic follows its gateway's carrier when that gateway is relayed to.
        for name, carrier in carriers.items():
            if carrier in relayed:
                carriers[name] = relayed[carrier]
        return Paths(local, own, carriers, direct, relayed, tuple(sorted(unrouted)), self.gateways)

    def _relayed_pairs(self) -> dict[tuple[str, str], str]:
        """Pairs that should be direct and both say they cannot -> the relay each goes through (none: no node can)."""
        relays: dict[tuple[str, str], str] = {}
        for a, record in self.nodes.items():
            for b in record.unreachable:
                other = self.nodes.get(b)
                if a < b and other is not None and a in other.unreachable and self.direct(a, b):
                    relay = self._relay_for(a, b)
                    if relay is not None:
                        relays[(a, b)] = relay
        return relays

    def _relay_for(self, a: str, b: str) -> str | None:
        """The relay of pair ``a``-``b``: of the nodes direct with both that name neither as unreachable (nor are
        named by them), those the Mesh allows (by default gateways), the first by name."""
        ra, rb = self.nodes[a], self.nodes[b]
        allowed: Iterable[str] = self._gateway_nodes if self._relays_allowed is None else self._relays_allowed
        fit = sorted(
            c
            for c in allowed
            if c not in (a, b)
            and c in self.nodes
            and c not in ra.unreachable
            and c not in rb.unreachable
            and a not in self.nodes[c].unreachable
            and b not in self.nodes[c].unreachable
            and self.direct(c, a)
            and self.direct(c, b)
        )
        return fit[0] if fit else None


def routing_of(view: MeshReader) -> Routing:
    """The routing of every node record of ``view``, by its config's rules: what status, the graph and the
    operator show (each agent routes the records its fold takes, which leaves out conflicting ones)."""
    config = view.config
    return Routing(
        {name: entry.record for name, entry in view.nodes.items()},
        view.gateway_candidacies,
        gateways=None if config.gateways is None else frozenset(config.gateways),
        relays=None if config.relays is None else frozenset(config.relays),
    )


def routed_peers(
    paths: Paths,
    nodes: Mapping[str, NodeRecord],
    specs: Mapping[str, tuple[PeerSpec, PeerSpec | None]],
    families: tuple[int, ...],
) -> dict[str, PeerSpec]:
    """The device's node peers along ``paths``: each node it talks to directly, dialled at the endpoint its path
    takes, with the routes of every node it is the path to (none when the pair is relayed); its announced next key
    (``specs``: the fold's peer of each node, and that of its next key) beside it, as the fold has it."""
    carried: dict[str, list[str]] = {}
    for name, carrier in paths.carriers.items():
        carried.setdefault(carrier, []).append(name)
    peers: dict[str, PeerSpec] = {}
    for name, external in paths.direct.items():
        endpoint = dialled_endpoint(nodes[name], families, external=external)
        routes = tuple(sorted(text for n in carried.get(name, ()) for text in nodes[n].routes.text))
        spec, announced = specs[name]
        peers[spec.public_key] = PeerSpec(spec.public_key, endpoint, routes, spec.persistent_keepalive)
        if announced is not None:
            peers[announced.public_key] = PeerSpec(announced.public_key, endpoint, (), announced.persistent_keepalive)
    return peers


def dialled_endpoint(record: NodeRecord, families: tuple[int, ...], *, external: bool = False) -> str | None:
    """The endpoint of ``record`` this node dials (``external``: from another location, its external endpoints
    if it has any): of the families both have, IPv4 if both have it (the same choice on both sides, so neither's
    endpoint flips with every packet; and 20 bytes less overhead), else IPv6. None when they share no family: the
    peer is still configured, so its traffic stays in the tunnel, but nothing is dialled (``Topology.unreachable``
    says so)."""
    endpoints = record.external_endpoints if external and record.external_endpoints else record.endpoints
    texts = record.endpoint_texts if endpoints is record.endpoints else tuple(str(e) for e in endpoints)
    if len(texts) == 1:
        return texts[0] if endpoints[0].host.version in families else None
    for version in (4, 6):
        if version in families:
            for endpoint, text in zip(endpoints, texts, strict=True):
                if endpoint.host.version == version:
                    return text
    return None


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)
