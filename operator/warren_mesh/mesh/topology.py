"""The desired WireGuard device of one node, computed from the mesh view alone (pure: no I/O, no clock).

Conflicts are settled the same way on every node, so the mesh stays symmetric: records are taken in order of
their etcd create revision and a record that collides with one taken before it (same public key, allowed IPs
overlapping another peer's) is left out, as is a record that claims what the mesh never gave it (mesh/claims.py).
Overlaps matter because WireGuard routes by allowed IPs: a record that claims another node's address would
otherwise silently take its traffic. The decider (decision.py) keeps a ``TopologyBuilder``; ``build_topology``
folds from scratch (the tests compare the two).

An agent sees one change at a time in a mesh of hundreds, so ``TopologyBuilder`` keeps the fold and updates it
for the records a change touched: a node joining comes last in create-revision order and is settled against
what is already taken; a node leaving frees what it held. Whenever a change could alter how a later record was
settled (it lands in the middle and collides, or records after it are in conflict), the builder folds everything
again, so the result is always exactly what a fold from scratch gives (the tests compare both on random runs).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from warren_mesh.mesh.changes import Changes
from warren_mesh.mesh.claims import SELF_REASONS, ClaimRules, Conflict, LocalNode, NetworkClaims
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.interface import device_mtu, interface_addresses, pod_aggregates
from warren_mesh.mesh.paths import Paths, PathSummary, dialled_endpoint, puts_paths_in_play
from warren_mesh.mesh.plan import RouteChange
from warren_mesh.mesh.routed_peers import RoutedPeers
from warren_mesh.mesh.view import Entry, MeshReader
from warren_mesh.trust.reasons import REASON_DUPLICATE_PUBLIC_KEY, REASON_OVERLAPPING_ALLOWED_IPS
from warren_mesh.trust.records import ExternalPeer, MeshConfig, NodeRecord
from warren_mesh.values.device import InterfaceSpec, PeerSpec
from warren_mesh.values.routes import Routes

# A record taking part in the fold: ("node" | "peer", name), and where it stands in it.
Candidate = tuple[str, str]
_Position = tuple[int, str, int]  # (create revision, name, 0 for a node / 1 for a peer)
_LOCAL: Final = ("local", "")


@dataclass(frozen=True, slots=True)
class _Settled:
    """How one record came out of the fold: taken (``spec``) or left out (``conflict``)."""

    entry: Entry[NodeRecord] | Entry[ExternalPeer]
    position: _Position
    spec: PeerSpec | None
    conflict: Conflict | None
    announced: PeerSpec | None = None  # a rotating node's next key: a peer with no allowed IPs yet

    @property
    def keys(self) -> tuple[str, ...]:
        """The public keys whose peers this record gave the device."""
        keys = () if self.spec is None else (self.spec.public_key,)
        return keys if self.announced is None else (*keys, self.announced.public_key)


class TopologyBuilder:
    """The fold over one view, kept between changes (see the module's docstring)."""

    def __init__(self, local: LocalNode, *, auto_mtu: int, fwmark: int = 0) -> None:
        """``auto_mtu``: the device's MTU when the mesh says ``auto`` (``model.auto_mtu`` of the underlay)."""
        self._local = local
        self._auto_mtu = auto_mtu
        self._fwmark = fwmark
        self._reset(MeshConfig(), None)
        self.rebuilds = 0  # folds from scratch; tests and benchmarks read it

    @property
    def local_name(self) -> str:
        return self._local.name

    def _reset(self, config: MeshConfig, view: MeshReader | None) -> None:
        self._config = config
        self._rules = ClaimRules(config, self._local, view)
        self._interface = InterfaceSpec(
            addresses=interface_addresses(config, self._local),
            listen_port=config.listen_port,
            mtu=device_mtu(config, self._auto_mtu),
            fwmark=self._fwmark,
        )
        self._aggregates = pod_aggregates(config, self._local)
        self._claims = NetworkClaims()
        self._holders: dict[str, Candidate] = {}  # public key -> the record that has it
        self._settled: dict[Candidate, _Settled] = {}
        self._order: list[_Position] = []  # every settled record's position, sorted
        self._conflicts: dict[Candidate, _Settled] = {}
        self._specs: dict[str, PeerSpec] = {}  # public key -> peer, of taken records
        self._names: dict[str, str] = {}  # public key -> node or peer name, of taken records
        # address inside the overlay network -> the records claiming it (a node's own address, a peer's host route)
        self._by_address: dict[str, set[Candidate]] = {}
        self._unreachable: set[str] = set()  # nodes taken with no endpoint this node can dial
        self.nodes_taken = 0
        self._view = view
        # Nodes taken whose records put paths in play (a location, an external endpoint, peers it cannot reach):
        # while there are none and nobody stands as a gateway, every node is a direct peer, as the fold has it.
        self._located = 0
        self._routing: RoutedPeers | None = None  # the paths and the device's peers, while paths are in play
        self._touched: set[str] = set()  # nodes the last update settled again
        # Public key -> the networks its peer gained and lost in the last update, where the paths know them.
        self.route_changes: Mapping[str, RouteChange] = {}
        local = self._local
        for version, prefixlen, first, _ in Routes.of(local.allowed_ips, hosts=local.overlay_ips).ranges:
            self._claims.add(version, prefixlen, first, local.name)
        self._holders[local.public_key] = _LOCAL

    def rebuild(self, view: MeshReader) -> None:
        """Fold every record of ``view`` from scratch."""
        self.rebuilds += 1
        self._reset(view.config, view)
        candidates = [(c, e, _position(c, e)) for c, e in _entries(view, self._local.name)]
        candidates.sort(key=lambda c: c[2])
        for candidate, entry, position in candidates:
            self._settle(candidate, entry, position, self._problem(candidate, entry))
        self._route()

    def update(self, view: MeshReader, changes: Changes) -> set[str] | None:
        """Bring the fold up to date with ``changes``; the public keys whose peer may differ now, or None when
        everything was folded again (the caller must then compare everything)."""
        self.route_changes = {}
        if changes.everything:  # a snapshot or a config change: nothing to update from
            self.rebuild(view)
            return None
        self._view = self._rules.view = view
        affected = self._fold_update(view, changes)
        if affected is None:
            return None  # folded from scratch, routed too
        routing = self._routing
        before = None if routing is None else routing.device
        if routing is not None and self._in_play() and self._local.name not in changes.nodes:
            delta = routing.update(self._taken_touched(), self._node_spec)
            if delta is not None:
                self.route_changes = routing.route_changes
                return routing.refresh(delta | affected, self._external_spec)
        self._route()
        after = None if self._routing is None else self._routing.device
        if before is None and after is None:
            return affected
        if before is None or after is None:
            return None  # paths came into play or left it: compare everything
        return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}

    def _fold_update(self, view: MeshReader, changes: Changes) -> set[str] | None:
        touched: dict[Candidate, bool] = {("node", n): False for n in changes.nodes if n != self._local.name}
        touched.update((("peer", n), False) for n in changes.peers)
        addresses = set(changes.addresses)  # a reservation changed under a record: settle it again
        for candidate in list(touched):
            # Who may hold an address depends on whether its holder claims it: a record that claims or gave up
            # an address has every other record on that address settled again.
            settled = self._settled.get(candidate)
            if settled is not None:
                addresses.update(self._rules.held_claims(settled.entry.record))
            entry = _entry(view, candidate)
            if entry is not None:
                addresses.update(self._rules.held_claims(entry.record))
        for address in addresses:
            for other in self._by_address.get(address, ()):
                touched[other] = True
        affected: set[str] = set()
        arrivals: list[tuple[_Position, Candidate, Entry[NodeRecord] | Entry[ExternalPeer]]] = []
        self._touched = set()
        for candidate, again in touched.items():
            entry = _entry(view, candidate)
            settled = self._settled.get(candidate)
            if settled is not None and entry is settled.entry and not again:
                continue
            if candidate[0] == "node":
                self._touched.add(candidate[1])
            if settled is not None:
                affected.update(settled.keys)
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
            affected.update(self._settled[candidate].keys)
        return affected

    @property
    def peers(self) -> Mapping[str, PeerSpec]:
        """The device's peers by public key, live: valid until the next update, not to be kept."""
        return self._specs if self._routing is None else self._routing.device

    @property
    def names(self) -> Mapping[str, str]:
        """Public key -> node or peer name of the taken records, live like ``peers``."""
        return self._names

    @property
    def paths(self) -> Paths | None:
        """How this node reaches the others when locations, gateways or relays are in play (None: directly)."""
        return None if self._routing is None else self._routing.paths()

    @property
    def path_summary(self) -> PathSummary | None:
        """``paths`` in brief, for what is said after every pass (None: every node directly)."""
        return None if self._routing is None else self._routing.summary()

    @property
    def unreachable(self) -> tuple[str, ...]:
        """Nodes taken that share no underlay family with this one (configured, never dialled)."""
        return tuple(sorted(self._unreachable))

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        """The records left out, in fold order."""
        if not self._conflicts:
            return ()
        ordered = sorted(self._conflicts.values(), key=lambda s: s.position)
        return tuple(s.conflict for s in ordered if s.conflict is not None)

    def set_local(self, local: LocalNode, view: MeshReader) -> None:
        """This node's identity changed (a new key): fold again around it."""
        self._local = local
        self.rebuild(view)

    @property
    def local(self) -> LocalNode:
        return self._local

    def set_auto_mtu(self, auto_mtu: int) -> bool:
        """The underlay's MTU changed: the device's MTU follows if the mesh says ``auto``. Whether it changed."""
        if auto_mtu == self._auto_mtu:
            return False
        self._auto_mtu = auto_mtu
        mtu = device_mtu(self._config, auto_mtu)
        if mtu == self._interface.mtu:
            return False
        self._interface = dataclasses.replace(self._interface, mtu=mtu)
        return True

    def topology(self) -> Topology:
        """The fold's result, as values that later updates do not change."""
        return Topology(
            self._interface,
            dict(self.peers),
            dict(self._names),
            self.conflicts,
            self._aggregates,
            self.unreachable,
            self.paths,
        )

    def _in_play(self) -> bool:
        """Whether locations, gateways or relays are in play (else every node is a direct peer, as folded)."""
        view = self._view
        own = view.nodes.get(self._local.name) if view is not None else None
        if view is None or own is None:
            return False
        return bool(self._located or view.gateway_candidacies or puts_paths_in_play(own.record))

    def _route(self) -> None:
        """Work out the device's peers from the paths when they are in play: a peer carries the routes of every
        node it is the path to, a node reached through another is no peer (mesh/paths.py, mesh/routed_peers.py).
        Else leave the fold's peers as the device's."""
        view = self._view
        if view is None or not self._in_play():
            self._routing = None
            return
        nodes: dict[str, NodeRecord] = {self._local.name: view.nodes[self._local.name].record}
        specs: dict[str, tuple[PeerSpec, PeerSpec | None]] = {}
        for (kind, name), settled in self._settled.items():
            record = settled.entry.record
            if kind == "node" and settled.spec is not None and isinstance(record, NodeRecord):
                nodes[name] = record
                specs[name] = (settled.spec, settled.announced)
        config = self._config
        self._routing = RoutedPeers(self._local.name, self._local.underlay_families, config.gateways, config.relays)
        self._routing.work_out(nodes, specs, view.gateway_candidacies)
        self._routing.device.update((k, spec) for k, spec in self._specs.items() if self._holders[k][0] == "peer")

    def _taken_touched(self) -> dict[str, NodeRecord | None]:
        """The nodes the last update settled again: each one's record if it is taken, else None."""
        taken: dict[str, NodeRecord | None] = {}
        for name in self._touched:
            settled = self._settled.get(("node", name))
            record = settled.entry.record if settled is not None and settled.spec is not None else None
            taken[name] = record if isinstance(record, NodeRecord) else None
        return taken

    def _node_spec(self, name: str) -> tuple[PeerSpec, PeerSpec | None]:
        settled = self._settled[("node", name)]
        assert settled.spec is not None, f"{name} is routed, so it was taken"
        return settled.spec, settled.announced

    def _external_spec(self, key: str) -> PeerSpec | None:
        """The fold's peer of ``key`` if an external peer's record holds it."""
        holder = self._holders.get(key)
        return self._specs[key] if holder is not None and holder[0] == "peer" else None

    def _arrive(
        self, candidate: Candidate, entry: Entry[NodeRecord] | Entry[ExternalPeer], position: _Position
    ) -> bool:
        """Settle a record that joined the fold; False when only a fold from scratch can place it exactly."""
        problem = self._problem(candidate, entry)
        if self._order and position < self._order[-1]:
            # Not last in line. Left out for a reason of its own (its address), it affects nobody; otherwise it
            # is exact only if it collides with no one (later holders would lose to it) and no later record
            # is in conflict (it might now collide with this one instead).
            independent = problem is not None and problem.reason in SELF_REASONS
            if not independent and (problem is not None or self._conflicts_after(position)):
                return False
        self._settle(candidate, entry, position, problem)
        return True

    def _unsettle(self, candidate: Candidate, settled: _Settled) -> bool:
        """Take a record out of the fold; False when records after it may have been settled differently."""
        del self._settled[candidate]
        del self._order[bisect.bisect_left(self._order, settled.position)]
        record = settled.entry.record
        for address in self._rules.held_claims(record):
            holders = self._by_address[address]
            holders.discard(candidate)
            if not holders:
                del self._by_address[address]
        if settled.spec is None:
            del self._conflicts[candidate]
            return True
        for version, prefixlen, first, _ in record.routes.ranges:
            self._claims.remove(version, prefixlen, first)
        for key in settled.keys:
            del self._holders[key]
            del self._specs[key]
            del self._names[key]
        if candidate[0] == "node":
            self.nodes_taken -= 1
            self._located -= puts_paths_in_play(record)
            self._unreachable.discard(candidate[1])
        # What it held is free now: a record after it that was left out for colliding may be taken now.
        return not self._conflicts_after(settled.position)

    def _conflicts_after(self, position: _Position) -> bool:
        """Whether a record after ``position`` is left out for colliding with one before it: what a record that
        comes or goes there may change. One left out for a reason of its own (its claims lost, an address
        outside the mesh) stays so whatever comes or goes before it; its claims changing reach it through the
        addresses a change touched. In a cluster booting at once, claim races leave dozens of such records out
        for a while, and counting them made every agent fold from scratch at almost every change."""
        return any(
            s.position > position
            for s in self._conflicts.values()
            if s.conflict is not None and s.conflict.reason not in SELF_REASONS
        )

    def _settle(
        self,
        candidate: Candidate,
        entry: Entry[NodeRecord] | Entry[ExternalPeer],
        position: _Position,
        problem: Conflict | None,
    ) -> None:
        record = entry.record
        for address in self._rules.held_claims(record):
            self._by_address.setdefault(address, set()).add(candidate)
        bisect.insort(self._order, position)
        if problem is not None:
            self._settled[candidate] = self._conflicts[candidate] = _Settled(entry, position, None, problem)
            return
        name = candidate[1]
        for version, prefixlen, first, _ in record.routes.ranges:
            self._claims.add(version, prefixlen, first, name)
        spec = self._spec(record)
        announced = None
        if isinstance(record, NodeRecord) and record.next_public_key is not None:
            # No allowed IPs (they stay with the key in use until the node switches) and no keepalive (nothing
            # answers that key until then).
            announced = PeerSpec(record.next_public_key, spec.endpoint, (), 0)
        settled = _Settled(entry, position, spec, None, announced)
        for peer in (spec, announced):
            if peer is not None:
                self._holders[peer.public_key] = candidate
                self._specs[peer.public_key] = peer
                self._names[peer.public_key] = name
        self._settled[candidate] = settled
        if candidate[0] == "node":
            self.nodes_taken += 1
            self._located += puts_paths_in_play(record)
            if spec.endpoint is None:
                self._unreachable.add(name)

    def _spec(self, record: NodeRecord | ExternalPeer) -> PeerSpec:
        config = self._config
        if isinstance(record, NodeRecord):
            endpoint = dialled_endpoint(record, self._local.underlay_families)
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
        problem = self._rules.problem(name, entry.record, entry.create_revision)
        if problem is not None:
            return problem
        for key in record.public_keys if isinstance(record, NodeRecord) else (record.public_key,):
            holder = self._holders.get(key)
            if holder is not None:
                holder_name = self._local.name if holder == _LOCAL else holder[1]
                return Conflict(name, REASON_DUPLICATE_PUBLIC_KEY, f"{name} uses the public key of {holder_name}")
        routes = record.routes
        for text, (version, _, first, last) in zip(routes.text, routes.ranges, strict=True):
            owner = self._claims.owner_of_overlap(version, first, last)
            if owner is not None:
                return Conflict(name, REASON_OVERLAPPING_ALLOWED_IPS, f"{name} claims {text}, which overlaps {owner}'s")
        return None


def build_topology(*, local: LocalNode, view: MeshReader, auto_mtu: int, fwmark: int = 0) -> Topology:
    """The desired device for ``local``, folded from scratch (``status`` and tests; the agent keeps a builder)."""
    builder = TopologyBuilder(local, auto_mtu=auto_mtu, fwmark=fwmark)
    builder.rebuild(view)
    return builder.topology()


def _position(candidate: Candidate, entry: Entry[NodeRecord] | Entry[ExternalPeer]) -> _Position:
    return (entry.create_revision, candidate[1], 0 if candidate[0] == "node" else 1)


def _entry(view: MeshReader, candidate: Candidate) -> Entry[NodeRecord] | Entry[ExternalPeer] | None:
    kind, name = candidate
    return view.nodes.get(name) if kind == "node" else view.peers.get(name)


def _entries(view: MeshReader, local_name: str) -> Iterator[tuple[Candidate, Entry[NodeRecord] | Entry[ExternalPeer]]]:
    for name, node in view.nodes.items():
        if name != local_name:
            yield ("node", name), node
    for name, peer in view.peers.items():
        yield ("peer", name), peer
