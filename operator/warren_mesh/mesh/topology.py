"""The desired WireGuard device of one node, computed from the mesh view alone (pure: no I/O, no clock).

The same fold serves the agent, ``warren-mesh status`` and the benchmarks. Conflicts are settled the same way on
every node, so the mesh stays symmetric: records are taken in order of their etcd create revision and a record
that collides with one taken before it (same public key, an address reserved for someone else, allowed IPs
overlapping another peer's) is left out. Overlaps matter because WireGuard routes by allowed IPs: a record that
claims another node's address would otherwise silently take its traffic.

What a record may claim is limited to what the mesh gave it. A node: its reserved overlay address (a usable host
of the overlay network) and networks inside the pod network. An external peer: networks outside the overlay and
pod networks, and inside the overlay network single addresses only. An address reserved under ``ipam/`` belongs
to its holder: a record claiming it loses when the holder itself claims it (however old the claim), or when the
reservation is older than the claim. So a node's own reservation and record always win over a later claim, and
a reservation rewritten under a node after it registered takes nothing from it. Nothing may be routed over the
networks this node must reach outside the tunnel (``LocalNode.protected``: its underlay, its etcd).

An agent sees one change at a time in a mesh of hundreds, so ``TopologyBuilder`` keeps the fold and updates it
for the records a change touched: a node joining comes last in create-revision order and is settled against
what is already taken; a node leaving frees what it held. Whenever a change could alter how a later record was
settled (it lands in the middle and collides, or records after it are in conflict), the builder folds everything
again, so the result is always exactly what a fold from scratch gives (the tests compare both on random runs).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from warren_mesh.admission import usable_host_range
from warren_mesh.device import InterfaceSpec, PeerSpec
from warren_mesh.mesh.peers import Changes, Entry, MeshView, Reservation
from warren_mesh.model import WIREGUARD_OVERHEAD, ExternalPeer, MeshConfig, NodeRecord
from warren_mesh.netaddr import IPAddress, IPNetwork
from warren_mesh.routes import Routes
from warren_mesh.validation import (
    REASON_ADDRESS_OUTSIDE_CIDR,
    REASON_ADDRESS_TAKEN,
    REASON_DUPLICATE_PUBLIC_KEY,
    REASON_NETWORK_NOT_OWNED,
    REASON_OVERLAPPING_ALLOWED_IPS,
    REASON_UNSAFE_ROUTE,
)


@dataclass(frozen=True, slots=True)
class LocalNode:
    name: str
    public_key: str
    overlay_ip: IPAddress
    allowed_ips: tuple[IPNetwork, ...] = ()
    # Networks this node reaches outside the tunnel and that no peer may take: its underlay address and subnet,
    # etcd's addresses. A route over them would cut the node off from its peers and from etcd (and so from the
    # very deletion that would repair it).
    protected: tuple[IPNetwork, ...] = ()


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


# A record taking part in the fold: ("node" | "peer", name), and where it stands in it.
Candidate = tuple[str, str]
_Position = tuple[int, str, int]  # (create revision, name, 0 for a node / 1 for a peer)
_LOCAL: Final = ("local", "")


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

    def remove(self, version: int, prefixlen: int, first: int) -> None:
        starts = self._starts[(version, prefixlen)]
        del starts[bisect.bisect_left(starts, first)]
        del self._owner[(version, prefixlen, first)]


@dataclass(frozen=True, slots=True)
class _Settled:
    """How one record came out of the fold: taken (``spec``) or left out (``conflict``)."""

    entry: Entry[NodeRecord] | Entry[ExternalPeer]
    position: _Position
    spec: PeerSpec | None
    conflict: Conflict | None


def device_mtu(config: MeshConfig, underlay_mtu: int) -> int:
    return config.mtu if config.mtu is not None else underlay_mtu - WIREGUARD_OVERHEAD


class TopologyBuilder:
    """The fold over one view, kept between changes (see the module's docstring)."""

    def __init__(self, local: LocalNode, *, underlay_mtu: int, fwmark: int = 0) -> None:
        self._local = local
        self._underlay_mtu = underlay_mtu
        self._fwmark = fwmark
        self._protected = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in local.protected)
        self._reset(MeshConfig(), None)
        self.rebuilds = 0  # folds from scratch; tests and benchmarks read it

    @property
    def local_name(self) -> str:
        return self._local.name

    def _reset(self, config: MeshConfig, view: MeshView | None) -> None:
        self._config = config
        self._view = view
        first, last = usable_host_range(config.overlay_cidr)
        self._overlay_range = (config.overlay_cidr.version, first, last)
        overlay, pods = config.overlay_cidr, config.pod_cidr
        self._mesh_ranges = tuple(
            (n.version, int(n.network_address), int(n.broadcast_address)) for n in (overlay, pods)
        )
        self._interface = InterfaceSpec(
            address=f"{self._local.overlay_ip}/{config.overlay_cidr.prefixlen}",
            listen_port=config.listen_port,
            mtu=device_mtu(config, self._underlay_mtu),
            fwmark=self._fwmark,
        )
        self._claims = _NetworkClaims()
        self._holders: dict[str, Candidate] = {}  # public key -> the record that has it
        self._settled: dict[Candidate, _Settled] = {}
        self._order: list[_Position] = []  # every settled record's position, sorted
        self._conflicts: dict[Candidate, _Settled] = {}
        self._specs: dict[str, PeerSpec] = {}  # public key -> peer, of taken records
        self._names: dict[str, str] = {}  # public key -> node or peer name, of taken records
        # address inside the overlay network -> the records claiming it (a node's own address, a peer's host route)
        self._by_address: dict[str, set[Candidate]] = {}
        self.nodes_taken = 0
        local = self._local
        for version, prefixlen, first, _ in Routes.of(local.allowed_ips, host=local.overlay_ip).ranges:
            self._claims.add(version, prefixlen, first, local.name)
        self._holders[local.public_key] = _LOCAL

    def rebuild(self, view: MeshView) -> None:
        """Fold every record of ``view`` from scratch."""
        self.rebuilds += 1
        self._reset(view.config, view)
        candidates = [(c, e, _position(c, e)) for c, e in _entries(view, self._local.name)]
        candidates.sort(key=lambda c: c[2])
        for candidate, entry, position in candidates:
            self._settle(candidate, entry, position, self._problem(candidate, entry))

    def update(self, view: MeshView, changes: Changes) -> set[str] | None:
        """Bring the fold up to date with ``changes``; the public keys whose peer may differ now, or None when
        everything was folded again (the caller must then compare everything)."""
        if changes.everything:  # a snapshot or a config change: nothing to update from
            self.rebuild(view)
            return None
        self._view = view
        touched: dict[Candidate, bool] = {("node", n): False for n in changes.nodes if n != self._local.name}
        touched.update((("peer", n), False) for n in changes.peers)
        addresses = set(changes.addresses)  # a reservation changed under a record: settle it again
        for candidate in list(touched):
            # Who may hold an address depends on whether its holder claims it: a record that claims or gave up
            # an address has every other record on that address settled again.
            settled = self._settled.get(candidate)
            if settled is not None:
                addresses.update(self._overlay_claims(settled.entry.record))
            entry = _entry(view, candidate)
            if entry is not None:
                addresses.update(self._overlay_claims(entry.record))
        for address in addresses:
            for other in self._by_address.get(address, ()):
                touched[other] = True
        affected: set[str] = set()
        arrivals: list[tuple[_Position, Candidate, Entry[NodeRecord] | Entry[ExternalPeer]]] = []
        for candidate, again in touched.items():
            entry = _entry(view, candidate)
            settled = self._settled.get(candidate)
            if settled is not None:
                if entry is settled.entry and not again:
                    continue
                if settled.spec is not None:
                    affected.add(settled.spec.public_key)
                if not self._unsettle(candidate, settled):
                    self.rebuild(view)
                    return None
            if entry is not None:
                arrivals.append((_position(candidate, entry), candidate, entry))
        # In fold order, so that several nodes joining in one batch each come last in turn.
        for position, candidate, entry in sorted(arrivals, key=lambda a: a[0]):
            if not self._arrive(candidate, entry, position):
                self.rebuild(view)
                return None
            spec = self._settled[candidate].spec
            if spec is not None:
                affected.add(spec.public_key)
        return affected

    @property
    def peers(self) -> Mapping[str, PeerSpec]:
        """The taken records' peers by public key, live: valid until the next update, not to be kept."""
        return self._specs

    @property
    def names(self) -> Mapping[str, str]:
        """Public key -> node or peer name of the taken records, live like ``peers``."""
        return self._names

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        """The records left out, in fold order."""
        if not self._conflicts:
            return ()
        ordered = sorted(self._conflicts.values(), key=lambda s: s.position)
        return tuple(s.conflict for s in ordered if s.conflict is not None)

    def topology(self) -> Topology:
        """The fold's result, as values that later updates do not change."""
        return Topology(self._interface, dict(self._specs), dict(self._names), self.conflicts)

    def _arrive(
        self, candidate: Candidate, entry: Entry[NodeRecord] | Entry[ExternalPeer], position: _Position
    ) -> bool:
        """Settle a record that joined the fold; False when only a fold from scratch can place it exactly."""
        problem = self._problem(candidate, entry)
        if self._order and position < self._order[-1]:
            # Not last in line. Left out for a reason of its own (its address), it affects nobody; otherwise it
            # is exact only if it collides with no one (later holders would lose to it) and no later record
            # is in conflict (it might now collide with this one instead).
            independent = problem is not None and problem.reason in _SELF_REASONS
            if not independent and (problem is not None or self._conflicts_after(position)):
                return False
        self._settle(candidate, entry, position, problem)
        return True

    def _unsettle(self, candidate: Candidate, settled: _Settled) -> bool:
        """Take a record out of the fold; False when records after it may have been settled differently."""
        del self._settled[candidate]
        del self._order[bisect.bisect_left(self._order, settled.position)]
        record = settled.entry.record
        for address in self._overlay_claims(record):
            holders = self._by_address[address]
            holders.discard(candidate)
            if not holders:
                del self._by_address[address]
        if settled.spec is None:
            del self._conflicts[candidate]
            return True
        for version, prefixlen, first, _ in record.routes.ranges:
            self._claims.remove(version, prefixlen, first)
        del self._holders[record.public_key]
        del self._specs[record.public_key]
        del self._names[record.public_key]
        if candidate[0] == "node":
            self.nodes_taken -= 1
        # What it held is free now: a record after it that was left out for colliding may be taken now.
        return not self._conflicts_after(settled.position)

    def _conflicts_after(self, position: _Position) -> bool:
        return any(s.position > position for s in self._conflicts.values())

    def _settle(
        self,
        candidate: Candidate,
        entry: Entry[NodeRecord] | Entry[ExternalPeer],
        position: _Position,
        problem: Conflict | None,
    ) -> None:
        record = entry.record
        for address in self._overlay_claims(record):
            self._by_address.setdefault(address, set()).add(candidate)
        bisect.insort(self._order, position)
        if problem is not None:
            self._settled[candidate] = self._conflicts[candidate] = _Settled(entry, position, None, problem)
            return
        name = candidate[1]
        for version, prefixlen, first, _ in record.routes.ranges:
            self._claims.add(version, prefixlen, first, name)
        spec = self._spec(record)
        self._holders[record.public_key] = candidate
        self._specs[record.public_key] = spec
        self._names[record.public_key] = name
        self._settled[candidate] = _Settled(entry, position, spec, None)
        if candidate[0] == "node":
            self.nodes_taken += 1

    def _overlay_claims(self, record: NodeRecord | ExternalPeer) -> tuple[str, ...]:
        """The single addresses inside the overlay network that ``record`` claims (reservations decide who holds
        them): a node's own address, a peer's host routes."""
        if isinstance(record, NodeRecord):
            return (record.overlay_text,)
        overlay_version, overlay_start, overlay_end = self._mesh_ranges[0]
        return tuple(
            text.split("/", 1)[0]
            for text, (version, _, start, end) in zip(record.routes.text, record.routes.ranges, strict=True)
            if version == overlay_version and start == end and overlay_start <= start <= overlay_end
        )

    def _claim_problem(self, name: str, entry: Entry[NodeRecord] | Entry[ExternalPeer]) -> Conflict | None:
        """Why ``entry`` claims something the mesh never gave it (depends on the config, the reservations and the
        holders' own claims, never on the order of the fold), or None."""
        record = entry.record
        overlay_version, first, last = self._overlay_range
        (_, overlay_start, overlay_end), (_, pods_start, pods_end) = self._mesh_ranges
        config = self._config
        if isinstance(record, NodeRecord):
            if record.overlay_ip.version != overlay_version or not first <= int(record.overlay_ip) <= last:
                return Conflict(
                    name,
                    REASON_ADDRESS_OUTSIDE_CIDR,
                    f"{name}'s address {record.overlay_ip} is not a usable address of the mesh network "
                    f"{config.overlay_cidr}",
                )
            for text, (version, _, start, end) in zip(record.routes.text, record.routes.ranges, strict=True):
                if text == f"{record.overlay_text}/{record.overlay_ip.max_prefixlen}":
                    continue
                if version != config.pod_cidr.version or start < pods_start or end > pods_end:
                    return Conflict(
                        name,
                        REASON_NETWORK_NOT_OWNED,
                        f"{name} claims {text}: a node may claim its overlay address and networks inside the pod "
                        f"network {config.pod_cidr}, nothing else",
                    )
            endpoint = record.endpoint.host
            for network in (config.overlay_cidr, config.pod_cidr):
                if endpoint.version == network.version and endpoint in network:
                    message = f"{name}'s endpoint {endpoint} lies inside the mesh network {network}"
                    return Conflict(name, REASON_UNSAFE_ROUTE, message)
        else:
            for text, (version, prefixlen, start, end) in zip(record.routes.text, record.routes.ranges, strict=True):
                if version != overlay_version:
                    continue
                in_overlay = start <= overlay_end and end >= overlay_start
                in_pods = version == config.pod_cidr.version and start <= pods_end and end >= pods_start
                single = prefixlen == (32 if version == 4 else 128)
                if in_pods or (in_overlay and not (single and first <= start <= last)):
                    return Conflict(
                        name,
                        REASON_NETWORK_NOT_OWNED,
                        f"{name} claims {text}: inside the mesh's own networks an external peer may claim single "
                        "usable overlay addresses only",
                    )
        for address in self._overlay_claims(record):
            problem = self._reservation_problem(name, address, entry.create_revision)
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

    def _reservation_problem(self, name: str, address: str, claimed_at: int) -> Conflict | None:
        view = self._view
        reservation: Reservation | None = view.ipam.get(address) if view is not None else None
        if view is None or reservation is None or reservation.owner == name:
            return None
        local = self._local
        if reservation.owner == local.name:  # this node claims what its agent knows it holds, whatever etcd shows
            holder_claims = address == str(local.overlay_ip)
        else:
            holder_claims = _holder_claims(view, reservation.owner, address)
        if reservation.create_revision < claimed_at or holder_claims:
            return Conflict(name, REASON_ADDRESS_TAKEN, f"{name} claims {address}, reserved for {reservation.owner}")
        return None

    def _spec(self, record: NodeRecord | ExternalPeer) -> PeerSpec:
        config = self._config
        if isinstance(record, NodeRecord):
            endpoint: str | None = record.endpoint_text
            keepalive = config.persistent_keepalive
        else:
            endpoint = None if record.endpoint is None else str(record.endpoint)
            keepalive = (
                config.persistent_keepalive if record.persistent_keepalive is None else record.persistent_keepalive
            )
        return PeerSpec(
            public_key=record.public_key,
            endpoint=endpoint,
            allowed_ips=record.routes.text,
            persistent_keepalive=keepalive,
        )

    def _problem(self, candidate: Candidate, entry: Entry[NodeRecord] | Entry[ExternalPeer]) -> Conflict | None:
        """Why this record cannot be taken next to everything taken so far, or None."""
        record = entry.record
        name = candidate[1]
        problem = self._claim_problem(name, entry)
        if problem is not None:
            return problem
        holder = self._holders.get(record.public_key)
        if holder is not None:
            holder_name = self._local.name if holder == _LOCAL else holder[1]
            return Conflict(name, REASON_DUPLICATE_PUBLIC_KEY, f"{name} uses the public key of {holder_name}")
        routes = record.routes
        for text, (version, _, first, last) in zip(routes.text, routes.ranges, strict=True):
            owner = self._claims.owner_of_overlap(version, first, last)
            if owner is not None:
                return Conflict(name, REASON_OVERLAPPING_ALLOWED_IPS, f"{name} claims {text}, which overlaps {owner}'s")
        return None


def build_topology(
    *,
    local: LocalNode,
    view: MeshView,
    underlay_mtu: int,
    fwmark: int = 0,
) -> Topology:
    """The desired device for ``local``, folded from scratch (``status`` and tests; the agent keeps a builder)."""
    builder = TopologyBuilder(local, underlay_mtu=underlay_mtu, fwmark=fwmark)
    builder.rebuild(view)
    return builder.topology()


# Reasons that depend on the record alone (and the config and reservations), never on the records before it.
_SELF_REASONS: Final = frozenset(
    {REASON_ADDRESS_OUTSIDE_CIDR, REASON_ADDRESS_TAKEN, REASON_NETWORK_NOT_OWNED, REASON_UNSAFE_ROUTE}
)


def _position(candidate: Candidate, entry: Entry[NodeRecord] | Entry[ExternalPeer]) -> _Position:
    return (entry.create_revision, candidate[1], 0 if candidate[0] == "node" else 1)


def _entry(view: MeshView, candidate: Candidate) -> Entry[NodeRecord] | Entry[ExternalPeer] | None:
    kind, name = candidate
    return view.nodes.get(name) if kind == "node" else view.peers.get(name)


def _entries(view: MeshView, local_name: str) -> Iterator[tuple[Candidate, Entry[NodeRecord] | Entry[ExternalPeer]]]:
    for name, node in view.nodes.items():
        if name != local_name:
            yield ("node", name), node
    for name, peer in view.peers.items():
        yield ("peer", name), peer


def _holder_claims(view: MeshView, holder: str, address: str) -> bool:
    """Whether the holder of a reservation claims the reserved address itself (as a node or an external peer)."""
    node = view.nodes.get(holder)
    if node is not None and node.record.overlay_text == address:
        return True
    peer = view.peers.get(holder)
    return peer is not None and any(text.split("/", 1)[0] == address for text in peer.record.routes.text)
