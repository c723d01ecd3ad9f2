"""The device's node peers along the paths (mesh/paths.py), kept between changes. Pure: no I/O.

Working the paths out afresh costs a pass over every node, and so did every change: in a located mesh of 10,000
nodes an agent spent 18 ms per join (docs/benchmarks.md), 7x what it spent at 1,000. Most changes cannot move a
gateway or a relay: a node that stands for no gateway, has a location, names no node it cannot reach and is named
by none, joins, leaves or changes. Such a node's path depends only on where it is, so only its own peer and the
peers that carry its routes (before and after) change; every other change works everything out again. Each
carrier's routes are kept sorted, so the incremental result is exactly what ``routed_peers`` gives (the tests
compare the two on random meshes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping

from warren_mesh.mesh.candidacies import Candidacy
from warren_mesh.mesh.paths import Paths, PathSummary, Routing, dialled_endpoint, location_id, routed_peers
from warren_mesh.mesh.plan import RouteChange
from warren_mesh.trust.records import NodeRecord
from warren_mesh.values.device import PeerSpec
from warren_mesh.values.networks import EMPTY, Networks

NodeSpec = tuple[PeerSpec, PeerSpec | None]  # a node's peer, and that of its next key (the fold's)


class RoutedPeers:
    """One node's routed peers and paths; ``work_out`` from scratch, ``update`` for the nodes a change touched."""

    def __init__(
        self,
        local: str,
        families: tuple[int, ...],
        gateways: Collection[str] | None,
        relays: Collection[str] | None,
    ) -> None:
        """``gateways``, ``relays``: who the Mesh lets be either (None: any that can; gateways relay)."""
        self._local, self._families = local, families
        self._gateways_allowed, self._relays_allowed = _frozen(gateways), _frozen(relays)
        self.peers: dict[str, PeerSpec] = {}  # by public key, node peers only
        self.device: dict[str, PeerSpec] = {}  # the device's peers: these and the external peers the caller adds
        self._records: dict[str, NodeRecord] = {}  # the nodes routed, this node's own among them
        self._carriers: dict[str, str] = {}
        self._direct: dict[str, bool] = {}
        self._relayed: dict[str, str] = {}
        self._unrouted: set[str] = set()
        self._gateways: Mapping[str, str] = {}
        self._location = ""
        self._candidates: frozenset[str] = frozenset()
        self._named: Counter[str] = Counter()  # nodes some record names as unreachable, and how many do
        # Carrier -> the routes it carries, sorted; its peer's allowed IPs, shared with it: a gateway carries
        # thousands, and a change copies only the chunk it falls in (values/networks.py).
        self._routes: dict[str, Networks] = {}
        self._keys: dict[str, tuple[str, ...]] = {}  # direct node -> the public keys of its peers
        self._paths: Paths | None = None  # made when asked for, until the next change
        self._carried: dict[str, Counter[str]] = {}  # carrier -> its routes' net change in this update (+1, -1)
        # Public key of a peer the last update kept -> the networks it gained and lost: what the plan writes instead
        # of comparing the peer's thousands of allowed IPs (a gateway's peer carries the other locations' nodes).
        self.route_changes: dict[str, RouteChange] = {}

    def work_out(
        self,
        nodes: Mapping[str, NodeRecord],
        specs: Mapping[str, NodeSpec],
        candidacies: Mapping[str, Candidacy],
    ) -> None:
        """Every path and peer from ``nodes`` (the taken records, this node's own among them)."""
        self._paths = None
        self.route_changes = {}
        routing = Routing(nodes, candidacies, gateways=self._gateways_allowed, relays=self._relays_allowed)
        paths = routing.paths(self._local)
        self.peers = routed_peers(paths, nodes, specs, self._families)
        self.device = dict(self.peers)
        self._records = dict(nodes)
        self._carriers, self._direct = dict(paths.carriers), dict(paths.direct)
        self._relayed, self._unrouted = dict(paths.relayed), set(paths.unrouted)
        self._gateways, self._location = paths.gateways, paths.location
        self._candidates = frozenset(candidacies)
        self._named = Counter(name for record in nodes.values() for name in record.unreachable)
        carried: dict[str, list[str]] = {}
        for name, carrier in self._carriers.items():
            carried.setdefault(carrier, []).extend(nodes[name].routes.text)
        self._routes = {carrier: Networks(routes) for carrier, routes in carried.items()}
        self._keys = {name: _keys(*specs[name]) for name in self._direct}

    def update(self, changed: Mapping[str, NodeRecord | None], spec_of: Callable[[str], NodeSpec]) -> set[str] | None:
        """Bring the paths up to date with the nodes a change touched (``changed``: each one's record, None when
        it is no longer taken; ``spec_of``: a taken node's peers as the fold has them); the public keys whose
        peers may differ, or None when the change may move a gateway or a relay (``work_out`` then)."""
        for name, record in changed.items():
            if not self._plain(name, self._records.get(name)) or not self._plain(name, record):
                return None
        self._paths = None
        self._carried, self.route_changes = {}, {}
        dirty: set[str] = set()
        affected: set[str] = set()
        for name, record in changed.items():
            old = self._records.pop(name, None)
            if old is not None:
                self._leave(name, old, dirty, affected)
            if record is not None:
                self._records[name] = record
                self._join(name, record, dirty)
        for carrier in dirty:
            if carrier in self._direct:
                affected.update(self._set_peer(carrier, spec_of(carrier)))
        return affected

    def refresh(self, keys: set[str], external_of: Callable[[str], PeerSpec | None]) -> set[str]:
        """The device's peers of ``keys`` again: a node peer, else the external peer ``external_of`` gives; ``keys``."""
        for key in keys:
            spec = self.peers.get(key) or external_of(key)
            if spec is None:
                self.device.pop(key, None)
            else:
                self.device[key] = spec
        return keys

    def _plain(self, name: str, record: NodeRecord | None) -> bool:
        """Whether node ``name`` with ``record`` (None: none) can move no gateway and no relay (see the module's
        docstring)."""
        if name == self._local or name in self._candidates or name in self._named:
            return False
        if self._relays_allowed is not None and name in self._relays_allowed:
            return False
        return record is None or (record.location is not None and not record.unreachable)

    def _leave(self, name: str, record: NodeRecord, dirty: set[str], affected: set[str]) -> None:
        carrier = self._carriers.pop(name, None)
        self._unrouted.discard(name)
        if carrier is not None:
            routes = self._routes[carrier]
            carried = self._carried.setdefault(carrier, Counter())
            for text in record.routes.text:
                routes = routes.removing(text)
                carried[text] -= 1
            if routes or carrier == name:
                self._routes[carrier] = routes
            else:
                del self._routes[carrier]
            dirty.add(carrier)
        if self._direct.pop(name, None) is not None:
            self._routes.pop(name, None)
            for key in self._keys.pop(name):
                del self.peers[key]
                affected.add(key)
            dirty.discard(name)

    def _join(self, name: str, record: NodeRecord, dirty: set[str]) -> None:
        """As ``Routing.paths`` places a node that is no gateway and in no relayed pair."""
        there = location_id(record)
        if there == self._location:
            self._direct[name] = False
            carrier = name
            self._routes.setdefault(name, EMPTY)
        else:
            gateway, remote = self._gateways.get(self._location), self._gateways.get(there)
            through = remote if self._local == gateway else gateway
            if through is None or remote is None:
                self._unrouted.add(name)
                return
            carrier = self._relayed.get(through, through)
        self._carriers[name] = carrier
        routes = self._routes.get(carrier, EMPTY)
        carried = self._carried.setdefault(carrier, Counter())
        for text in record.routes.text:
            routes = routes.adding(text)
            carried[text] += 1
        self._routes[carrier] = routes
        dirty.add(carrier)

    def _set_peer(self, name: str, node_spec: NodeSpec) -> set[str]:
        """Direct node ``name``'s peers again (its routes or record changed); their public keys, old and new."""
        spec, announced = node_spec
        endpoint = dialled_endpoint(self._records[name], self._families, external=self._direct[name])
        keys = set(self._keys.get(name, ()))
        for key in keys:
            del self.peers[key]
        routes = self._routes.get(name, EMPTY)
        self.peers[spec.public_key] = PeerSpec(spec.public_key, endpoint, routes, spec.persistent_keepalive)
        if announced is not None:
            self.peers[announced.public_key] = PeerSpec(
                announced.public_key, endpoint, (), announced.persistent_keepalive
            )
        self._keys[name] = _keys(spec, announced)
        carried = self._carried.get(name)
        if spec.public_key in keys and carried is not None:  # the same peer, with other routes
            added = sorted(text for text, count in carried.items() if count > 0)
            removed = sorted(text for text, count in carried.items() if count < 0)
            self.route_changes[spec.public_key] = (added, removed)
        return keys | set(self._keys[name])

    def paths(self) -> Paths:
        """The paths as a value later updates do not change (the gateway's and reachability's loops ask every
        second or two: made once per change, not per question)."""
        if self._paths is None:
            self._paths = self._make_paths()
        return self._paths

    def summary(self) -> PathSummary:
        """What the agent says of its paths after each pass, without copying every node's carrier."""
        return PathSummary(
            self._location,
            self._gateways.get(self._location),
            dict(self._relayed),
            tuple(sorted(self._unrouted)),
        )

    def _make_paths(self) -> Paths:
        return Paths(
            self._local,
            self._location,
            dict(self._carriers),
            dict(self._direct),
            dict(self._relayed),
            tuple(sorted(self._unrouted)),
            self._gateways,
        )


def _keys(spec: PeerSpec, announced: PeerSpec | None) -> tuple[str, ...]:
    return (spec.public_key,) if announced is None else (spec.public_key, announced.public_key)


def _frozen(names: Collection[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)
