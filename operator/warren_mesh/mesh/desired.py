"""The desired WireGuard device of one node: the value the fold makes (mesh/topology.py) and the plan brings the
device to (mesh/plan.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from warren_mesh.mesh.claims import Conflict
from warren_mesh.mesh.paths import Paths
from warren_mesh.values.device import InterfaceSpec, PeerSpec


@dataclass(frozen=True, slots=True)
class Topology:
    interface: InterfaceSpec
    peers: Mapping[str, PeerSpec]  # by public key
    names: Mapping[str, str]  # public key -> node or peer name
    conflicts: tuple[Conflict, ...] = ()
    # Networks routed into the device whole, like the overlay's connected route: the mesh's pod network. Peers'
    # networks inside them need no route of their own (mesh/plan.py), so a thousand nodes' pod subnets are one
    # route, not a thousand (0.2 s of netlink at a cold start), and an address of no node's subnet goes to
    # WireGuard, which drops it, rather than out of the default route in the clear.
    aggregates: tuple[str, ...] = ()
    # Nodes this one shares no underlay family with (an IPv4-only node and an IPv6-only one): configured without
    # an endpoint, never dialled; status, metrics and the graph show them.
    unreachable: tuple[str, ...] = ()
    # With locations, gateways or relays in play: how this node reaches every other (None: all directly).
    paths: Paths | None = None
