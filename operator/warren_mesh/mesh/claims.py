"""What a record may claim next to the mesh's config, the address claims and this node: pure rules, no order.

A node may claim its reserved overlay address (a usable address of the overlay network) and networks inside the
pod network; an external peer networks outside both, and inside the overlay network single usable addresses
only. An address claimed under ``claims/<node>/overlay/`` belongs to its holder (the oldest claim on it): a
record claiming it loses when the holder itself claims it (however old the claim), or when the holder's claim is
older than the record. So a node's own claim and record always win over a later claim, and an address claimed
again for another after its node registered takes nothing from it. Nothing may be routed over the networks this
node must reach outside the tunnel (``LocalNode.protected``: its underlay, its etcd).

What depends on the order of the fold (who claimed a key or a network first) is the topology's (mesh/topology.py);
``NetworkClaims`` is the index it keeps of the networks taken so far.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Final

from warren_mesh.mesh.claim_slots import Reservation
from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.networks import usable_host_range
from warren_mesh.trust.reasons import (
    REASON_ADDRESS_OUTSIDE_CIDR,
    REASON_ADDRESS_TAKEN,
    REASON_NETWORK_NOT_OWNED,
    REASON_UNSAFE_ROUTE,
)
from warren_mesh.trust.records import ExternalPeer, MeshConfig, NodeRecord
from warren_mesh.values.netaddr import IPAddress, IPNetwork

# The reasons ``ClaimRules.problem`` gives: each depends on the record alone (and the config and the reservations),
# never on the records folded before it, so a record left out for one affects nobody else's place in the fold.
SELF_REASONS: Final = frozenset(
    {REASON_ADDRESS_OUTSIDE_CIDR, REASON_ADDRESS_TAKEN, REASON_NETWORK_NOT_OWNED, REASON_UNSAFE_ROUTE}
)


@dataclass(frozen=True, slots=True)
class LocalNode:
    name: str
    public_key: str
    overlay_ips: tuple[IPAddress, ...]  # one per overlay network, in the mesh's order
    allowed_ips: tuple[IPNetwork, ...] = ()
    # Networks this node reaches outside the tunnel and that no peer may take: its underlay address and subnet,
    # etcd's addresses. A route over them would cut the node off from its peers and from etcd (and so from the
    # very deletion that would repair it).
    protected: tuple[IPNetwork, ...] = ()
    # The IP versions of the underlay endpoints it publishes: the families it can dial peers over.
    underlay_families: tuple[int, ...] = (4, 6)

    @property
    def overlay_texts(self) -> tuple[str, ...]:
        return tuple(str(ip) for ip in self.overlay_ips)

    @property
    def subnet_texts(self) -> tuple[str, ...]:
        """Its pod subnets as records name them."""
        return tuple(str(n) for n in self.allowed_ips)


@dataclass(frozen=True, slots=True)
class Conflict:
    name: str  # the record left out
    reason: str
    message: str


class NetworkClaims:
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

    def remove(self, version: int, prefixlen: int, first: int) -> None:
        starts = self._starts[(version, prefixlen)]
        del starts[bisect.bisect_left(starts, first)]
        del self._owner[(version, prefixlen, first)]


class ClaimRules:
    """The rules of one config, for one node, against one view (``view`` follows the builder's updates)."""

    def __init__(self, config: MeshConfig, local: LocalNode, view: MeshReader | None) -> None:
        self._config = config
        self._local = local
        self.view = view
        # Per overlay network: (version, first usable, last usable, first address, last address).
        self._overlays = tuple((n.version, *usable_host_range(n), *_span(n)) for n in config.overlay_cidrs)
        # Per pod network: (version, first, last, node subnet length).
        self._pods = tuple((p.version, *_span(p.cidr), p.node_prefix) for p in config.pod_networks)
        self._mesh = tuple((n.version, *_span(n), n) for n in (*config.overlay_cidrs, *config.pod_cidrs))
        self._protected = tuple((n.version, *_span(n)) for n in local.protected)

    def held_claims(self, record: NodeRecord | ExternalPeer) -> tuple[str, ...]:
        """What ``record`` takes that claims decide who holds: a node's own overlay addresses and its pod subnets
        (with their /prefix), a peer's single addresses inside the overlay networks."""
        if isinstance(record, NodeRecord):
            texts, ips = record.overlay_texts, record.overlay_ips
            own = {f"{text}/{ip.max_prefixlen}" for text, ip in zip(texts, ips, strict=True)}
            return (*record.overlay_texts, *(text for text in record.routes.text if text not in own))
        return tuple(
            text.split("/", 1)[0]
            for text, (version, _, start, end) in zip(record.routes.text, record.routes.ranges, strict=True)
            if start == end and any(v == version and low <= start <= high for v, _, _, low, high in self._overlays)
        )

    def problem(self, name: str, record: NodeRecord | ExternalPeer, claimed_at: int) -> Conflict | None:
        """Why ``record`` (created at revision ``claimed_at``) claims something the mesh never gave it: depends
        on the config, the reservations and the holders' own claims, never on the order of the fold."""
        problem = (
            self._node_problem(name, record) if isinstance(record, NodeRecord) else self._peer_problem(name, record)
        )
        if problem is not None:
            return problem
        for subject in self.held_claims(record):
            problem = self._reservation_problem(name, subject, claimed_at)
            if problem is not None:
                return problem
        for text, (version, _, start, end) in zip(record.routes.text, record.routes.ranges, strict=True):
            for protected_version, protected_start, protected_end in self._protected:
                if version == protected_version and start <= protected_end and end >= protected_start:
                    return Conflict(
                        name,
                        REASON_UNSAFE_ROUTE,
                        f"{name} claims {text}, which would route this node's underlay or etcd into the tunnel",
                    )
        return None

    def _node_problem(self, name: str, record: NodeRecord) -> Conflict | None:
        """A node has a usable address of the overlay network of each family it has an address of, and a node
        subnet of at most one per pod network. Not every family need be there: a mesh that just gained one (an
        edit of the Mesh that makes it dual-stack) keeps every node's record until the node has claimed in it."""
        for ip in record.overlay_ips:
            overlay = next((o for o in self._overlays if o[0] == ip.version), None)
            if overlay is None or not overlay[1] <= int(ip) <= overlay[2]:
                networks = " and ".join(str(n) for n in self._config.overlay_cidrs)
                return Conflict(
                    name,
                    REASON_ADDRESS_OUTSIDE_CIDR,
                    f"{name}'s address {ip} is not a usable address of the mesh network {networks}",
                )
        own = {(ip.version, int(ip)) for ip in record.overlay_ips}
        families: set[int] = set()
        for text, (version, prefixlen, start, end) in zip(record.routes.text, record.routes.ranges, strict=True):
            if start == end and (version, start) in own:
                continue  # an overlay address of its own (the decoder keeps allowed_ips off them)
            pods = next((p for p in self._pods if p[0] == version and p[1] <= start and end <= p[2]), None)
            if pods is None:
                return Conflict(
                    name,
                    REASON_NETWORK_NOT_OWNED,
                    f"{name} claims {text}: a node may claim its overlay addresses and networks inside the pod "
                    f"networks {', '.join(str(n) for n in self._config.pod_cidrs)}, nothing else",
                )
            if prefixlen != pods[3] or version in families:
                return Conflict(
                    name,
                    REASON_NETWORK_NOT_OWNED,
                    f"{name} claims {text}: a node's pod network is one /{pods[3]} of each pod network, which it "
                    "claims",
                )
            families.add(version)
            if self.view is not None and text not in self.view.reservations:
                return Conflict(
                    name,
                    REASON_NETWORK_NOT_OWNED,
                    f"{name} claims {text}, a pod subnet nobody claimed (claims/{name}/pods/)",
                )
        for endpoint in (*record.endpoints, *record.external_endpoints):
            host = endpoint.host
            value = int(host)
            for version, start, end, network in self._mesh:
                if host.version == version and start <= value <= end:
                    message = f"{name}'s endpoint {host} lies inside the mesh network {network}"
                    return Conflict(name, REASON_UNSAFE_ROUTE, message)
        return None

    def _peer_problem(self, name: str, record: ExternalPeer) -> Conflict | None:
        """Inside the mesh's networks an external peer may claim single usable overlay addresses, nothing else."""
        for text, (version, prefixlen, start, end) in zip(record.routes.text, record.routes.ranges, strict=True):
            in_pods = any(v == version and start <= high and end >= low for v, low, high, _ in self._pods)
            single = prefixlen == (32 if version == 4 else 128)
            for overlay_version, first, last, low, high in self._overlays:
                if overlay_version != version or not (start <= high and end >= low):
                    continue
                if not (single and first <= start <= last):
                    in_pods = True  # inside an overlay network and not one usable address of it: as bad
            if in_pods:
                return Conflict(
                    name,
                    REASON_NETWORK_NOT_OWNED,
                    f"{name} claims {text}: inside the mesh's own networks an external peer may claim single "
                    "usable overlay addresses only",
                )
        return None

    def _reservation_problem(self, name: str, subject: str, claimed_at: int) -> Conflict | None:
        """``subject``: an overlay address, or a pod subnet with its /prefix."""
        view = self.view
        reservation: Reservation | None = view.reservations.get(subject) if view is not None else None
        if view is None or reservation is None or reservation.owner == name:
            return None
        local = self._local
        if reservation.owner == local.name:  # this node claims what its agent knows it holds, whatever etcd shows
            holder_claims = subject in local.overlay_texts or subject in local.subnet_texts
        else:
            holder_claims = _holder_claims(view, reservation.owner, subject)
        if reservation.create_revision < claimed_at or holder_claims:
            return Conflict(name, REASON_ADDRESS_TAKEN, f"{name} claims {subject}, claimed by {reservation.owner}")
        return None


def _holder_claims(view: MeshReader, holder: str, subject: str) -> bool:
    """Whether the holder of a claim takes what it claimed itself (as a node or an external peer)."""
    node = view.nodes.get(holder)
    if node is not None and (subject in node.record.overlay_texts or subject in node.record.routes.text):
        return True
    peer = view.peers.get(holder)
    return peer is not None and any(text.split("/", 1)[0] == subject for text in peer.record.routes.text)


def _span(network: IPNetwork) -> tuple[int, int]:
    return int(network.network_address), int(network.broadcast_address)
