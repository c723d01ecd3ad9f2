"""The smallest set of device changes that turns the device as it is into the device as it should be.

Peers are compared one by one and only those that differ are touched: replacing the whole peer list (as Kilo
does) would drop every live session on each change. Peers the device has but the mesh does not are removed only
once the caller knows the mesh completely (``remove_unknown``), so an agent that restarts next to a live device
does not strip it bare before its first snapshot arrives.

A peer's allowed IPs that only grow (a family gained, a node joining behind a gateway) are added to it, not
replaced: WireGuard replaces them by removing all and inserting the new ones, and a packet from that peer decrypted
in between fails the source check and is dropped. Removing one still takes the whole list (the kernels and
wireguard-go versions we support have no removal of a single allowed IP).

WireGuard updates a peer's endpoint itself when the peer roams (NAT rebinding). An endpoint that differs from
what we last asked for is therefore roaming, not drift, and is left alone unless the record itself changed.

Routes are part of the plan: every network of a peer's allowed IPs that neither the interface's own prefix nor the
pod network's one route (``Topology.aggregates``) already reaches is routed to the device, compared with the routes
the mesh owns there (protocol 158) like peers are, and a route deleted by hand comes back with the next full
comparison. Removals come first, additions last: a route appears only once its peer can take the traffic. A network
that moves from one peer to another in one plan stays routed throughout (the fold never gives one network to two
peers, so a route has exactly one peer).

``plan_changes`` compares with the device as read; ``plan_delta`` compares the topology last applied with the
new one for the peers a change touched, without reading the device (a full read costs O(peers) in netlink or
UAPI on every event). The agent uses the delta while it knows the device to be as it left it, and a full
comparison at start, after any failure, after a data-plane restart and on every periodic resync.
"""

from __future__ import annotations

import functools
import itertools
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from warren_mesh.mesh.desired import Topology
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec

PeerAction = Literal["add", "update", "remove"]
# What one device operation does; also how the agent counts what it applied (warren_mesh_applied_changes_total).
OperationKind = Literal["private_key", "interface", "set_peers", "add_route", "remove", "remove_route"]


# The networks a peer gained and lost since it was applied, each sorted (mesh/routed_peers.py works them out).
RouteChange = tuple[list[str], list[str]]


@dataclass(frozen=True, slots=True)
class PeerChange:
    action: PeerAction
    public_key: str
    spec: PeerSpec  # what to set; for a removal, what the device had (its routes go too)
    detail: str
    # For an update whose allowed IPs only grow (a family gained, a node joining behind a gateway): the networks
    # the device lacks, added to the ones it keeps. None: the allowed IPs are replaced, which empties them for a
    # moment; a packet from the peer decrypted then fails WireGuard's source check and is dropped.
    adding: tuple[str, ...] | None = None


class Operation(NamedTuple):
    """One step of a plan: what it does, and to what (``interface`` for "interface", ``peers`` for "set_peers" and
    "remove", ``network`` for the routes)."""

    # A NamedTuple, not a frozen dataclass: made once per watch batch or pass on every agent, and a tuple is built
    # in C (a frozen dataclass sets each field through object.__setattr__).

    kind: OperationKind
    interface: InterfaceSpec | None = None
    peers: tuple[PeerChange, ...] = ()
    network: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    interface: InterfaceSpec | None  # None: the interface is as it should be
    set_private_key: bool
    changes: tuple[PeerChange, ...]
    routes_to_remove: tuple[str, ...] = ()
    routes_to_add: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.interface is None and not self.set_private_key and not self.changes and not self.route_changes

    @property
    def route_changes(self) -> int:
        return len(self.routes_to_remove) + len(self.routes_to_add)

    def operations(self) -> tuple[Operation, ...]:
        """The plan as device operations, in the order they must run. Routes come after their peers and leave after
        them: traffic is routed into the device only while a peer is there to take it. Peers are set before others
        leave: allowed IPs moving from a leaving peer to another (a node's new key, docs/key-rotation.md) always
        have one of them to go to. All peers to set are one operation (one device transaction for a cold start's
        thousand peers)."""
        operations: list[Operation] = []
        if self.set_private_key:
            operations.append(Operation("private_key"))
        if self.interface is not None:
            operations.append(Operation("interface", interface=self.interface))
        upserts = tuple(change for change in self.changes if change.action != "remove")
        if upserts:
            operations.append(Operation("set_peers", peers=upserts))
        operations.extend(Operation("add_route", network=network) for network in self.routes_to_add)
        operations.extend(Operation("remove", peers=(change,)) for change in self.changes if change.action == "remove")
        operations.extend(Operation("remove_route", network=network) for network in self.routes_to_remove)
        return tuple(operations)

    def explain(self, names: Mapping[str, str] | None = None) -> str:
        """One line per change, for the agent's log."""
        names = names or {}
        lines = []
        if self.set_private_key:
            lines.append("interface: set private key")
        if self.interface is not None:
            lines.append(
                f"interface: address {', '.join(self.interface.addresses)}, port {self.interface.listen_port}, "
                f"mtu {self.interface.mtu}"
            )
        for change in self.changes:
            who = names.get(change.public_key, change.public_key[:10] + "…")
            lines.append(f"{change.action} peer {who}: {change.detail}")
        lines.extend(f"remove route {network}" for network in self.routes_to_remove)
        lines.extend(f"add route {network}" for network in self.routes_to_add)
        return "\n".join(lines) if lines else "no changes"


def routed(interface_addresses: Iterable[str], networks: Iterable[str], aggregates: Iterable[str] = ()) -> set[str]:
    """The networks that need a route of their own: those that neither the interface's own prefixes (its connected
    routes, e.g. the overlay /16 for peers' /32 addresses) nor an aggregate route (a pod network, for nodes'
    subnets) already reaches."""
    covering = [_span(network) for network in (*aggregates, *interface_addresses)]
    result = set()
    for text in networks:
        net_version, net_first, net_last = _span(text)
        if not any(net_version == v and first <= net_first and net_last <= last for v, first, last in covering):
            result.add(text)
    return result


@functools.lru_cache(maxsize=65536)
def _span(text: str) -> tuple[int, int, int]:
    """(IP version, first, last address) of a network, or of an interface address's network, from canonical CIDR
    text. Every join brings a peer address not seen before, so this runs once per change: parsed with the C
    parser (ipaddress took ~15 us, most of a delta pass), and cached for the resyncs."""
    address, _, length = text.partition("/")
    try:
        packed, version = socket.inet_pton(socket.AF_INET, address), 4
    except OSError:
        packed, version = socket.inet_pton(socket.AF_INET6, address), 6
    bits = 32 if version == 4 else 128
    size = 1 << (bits - (int(length) if length else bits))
    first = int.from_bytes(packed, "big") & ~(size - 1)
    return version, first, first + size - 1


def desired_routes(desired: Topology) -> set[str]:
    networks = (n for spec in desired.peers.values() for n in spec.allowed_ips)
    return routed(desired.interface.addresses, networks, desired.aggregates) | set(desired.aggregates)


def plan_changes(
    desired: Topology,
    device: DeviceState,
    *,
    local_public_key: str,
    previous: Topology | None = None,
    remove_unknown: bool = True,
) -> Plan:
    interface = None if device.interface == desired.interface else desired.interface
    changes: list[PeerChange] = []
    if remove_unknown:
        changes.extend(
            PeerChange("remove", key, have, "no longer in the mesh")
            for key, have in device.peers.items()
            if key not in desired.peers
        )
    for key, want in desired.peers.items():
        have = device.peers.get(key)
        if have is None:
            changes.append(PeerChange("add", key, want, _describe(want)))
            continue
        if have == want:
            continue
        before = previous.peers.get(key) if previous is not None else None
        if _only_roamed(have, want, before):
            continue
        changes.append(_update(key, have, want)[0])
    routes = desired_routes(desired)
    stale = sorted(device.routes - routes) if remove_unknown else []
    return Plan(
        interface,
        device.public_key != local_public_key,
        tuple(changes),
        tuple(stale),
        tuple(sorted(routes - device.routes)),
    )


def plan_delta(
    applied: Mapping[str, PeerSpec],
    desired: Mapping[str, PeerSpec],
    public_keys: Iterable[str],
    *,
    interface_addresses: Iterable[str],
    aggregates: Iterable[str] = (),
    route_changes: Mapping[str, RouteChange] | None = None,
) -> Plan:
    """The peer and route changes for ``public_keys`` from the peers last applied to the desired ones, the device
    being as it was left (the interface and the aggregate routes are never part of a delta: a config change makes
    the caller compare everything). Each network is one peer's, so the routes that change are those of the peers
    that changed. ``route_changes``: the networks a peer gained and lost since it was applied, where the caller
    knows them (sorted), instead of comparing its allowed IPs whole."""
    route_changes = route_changes or {}
    removals: list[PeerChange] = []
    changes: list[PeerChange] = []
    # Networks a changed peer gave up, and networks one took on: only these can change routes (a gateway's peer
    # keeps thousands through a join elsewhere, and collecting them all twice cost more than the join itself).
    gone: set[str] = set()
    new: set[str] = set()
    for key in sorted(public_keys):
        want = desired.get(key)
        before = applied.get(key)
        if want == before:
            continue
        if want is None:
            assert before is not None
            gone.update(before.allowed_ips)
            removals.append(PeerChange("remove", key, before, "no longer in the mesh"))
        elif before is None:
            new.update(want.allowed_ips)
            changes.append(PeerChange("add", key, want, _describe(want)))
        else:
            change, added, removed = _update(key, before, want, route_changes.get(key))
            new.update(added)
            gone.update(removed)
            changes.append(change)
    # A network moving from one peer to another in this plan is in both: it stays routed.
    before_routed = routed(interface_addresses, gone - new, aggregates)
    after_routed = routed(interface_addresses, new - gone, aggregates)
    return Plan(None, False, (*removals, *changes), tuple(sorted(before_routed)), tuple(sorted(after_routed)))


def _update(
    key: str, have: PeerSpec, want: PeerSpec, known: RouteChange | None = None
) -> tuple[PeerChange, list[str], list[str]]:
    """An update of a peer the device has as ``have`` (allowed IPs that only grow are added, not replaced), and
    the networks it adds and removes (``known``: as the caller worked them out, if they add up)."""
    if have.allowed_ips == want.allowed_ips:
        return PeerChange("update", key, want, _difference(have, want, (), ()), ()), [], []
    if known is not None and len(have.allowed_ips) + len(known[0]) - len(known[1]) == len(want.allowed_ips):
        added, removed = known
    else:
        before, after = set(have.allowed_ips), set(want.allowed_ips)
        added, removed = sorted(after - before), sorted(before - after)
    detail = _difference(have, want, added, removed)
    return PeerChange("update", key, want, detail, None if removed else tuple(added)), added, removed


def _only_roamed(have: PeerSpec, want: PeerSpec, before: PeerSpec | None) -> bool:
    """The device's endpoint moved on its own while the record's endpoint stayed what we set before."""
    return (
        have.endpoint is not None
        and before is not None
        and before.endpoint == want.endpoint
        and have.allowed_ips == want.allowed_ips
        and have.persistent_keepalive == want.persistent_keepalive
    )


# Allowed IPs named in a logged change: a gateway carries the routes of every node of the other locations, and
# listing 9,000 of them (twice) on every join made each log line ~300 KB at 10,000 nodes.
SHOWN_NETWORKS = 4


def _networks(networks: Iterable[str], count: int) -> str:
    shown = list(itertools.islice(networks, SHOWN_NETWORKS))
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return ",".join(shown) + more


def _describe(spec: PeerSpec) -> str:
    allowed = _networks(spec.allowed_ips, len(spec.allowed_ips))
    return f"endpoint {spec.endpoint or '-'}, allowed {allowed}, keepalive {spec.persistent_keepalive}"


def _difference(have: PeerSpec, want: PeerSpec, added: Sequence[str], removed: Sequence[str]) -> str:
    parts = []
    if have.endpoint != want.endpoint:
        parts.append(f"endpoint {have.endpoint or '-'} -> {want.endpoint or '-'}")
    if added or removed or have.allowed_ips != want.allowed_ips:  # known to differ when something came or went
        change = [f"+{_networks(added, len(added))}"] if added else []
        change += [f"-{_networks(removed, len(removed))}"] if removed else []
        parts.append(f"allowed {' '.join(change) or 'reordered'} ({len(want.allowed_ips)} in all)")
    if have.persistent_keepalive != want.persistent_keepalive:
        parts.append(f"keepalive {have.persistent_keepalive} -> {want.persistent_keepalive}")
    return "; ".join(parts)
