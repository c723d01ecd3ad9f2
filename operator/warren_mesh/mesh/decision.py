"""Decide: what this node's device should be now, and the ordered plan that gets it there from what it was given.

One object holds all the deciding state of an agent: the incremental fold (``TopologyBuilder``), the changes the
observe stage handed on since the last pass (``ChangeLog``), what the device was last given, and whether the next
plan must be made against the device as read (at start, after a failure, after a data-plane restart, on every
resync) or may be a delta from what was given (every other pass: a change costs what it touched). Pure: the apply
stage reads the device when ``fold`` says so, and carries the plan out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

from warren_mesh.mesh.changes import ChangeLog, Changes
from warren_mesh.mesh.claims import Conflict, LocalNode
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.paths import Paths, PathSummary
from warren_mesh.mesh.plan import Plan, plan_changes, plan_delta
from warren_mesh.mesh.topology import TopologyBuilder
from warren_mesh.mesh.view import MeshReader
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec
from warren_mesh.values.netaddr import IPAddress, IPNetwork


class Fold(NamedTuple):
    """The fold brought up to date: whether the plan needs the device as it is, and the publish times of the node
    records folded in (for convergence lag)."""

    # A NamedTuple, not a frozen dataclass: made once per watch batch or pass on every agent, and a tuple is built
    # in C (a frozen dataclass sets each field through object.__setattr__).

    needs_device: bool
    published: Mapping[str, float]


class Decision(NamedTuple):
    plan: Plan
    names: Mapping[str, str]  # public key -> node or peer name, for every peer the plan touches (to explain it)
    full: bool  # made against the device as read: the pass that also keeps the host's pod network in place
    mtu: int  # the device's MTU (the pods' CNI network follows it)


class Decider:
    def __init__(self, local: LocalNode, *, auto_mtu: int, fwmark: int = 0) -> None:
        self._builder = TopologyBuilder(local, auto_mtu=auto_mtu, fwmark=fwmark)
        self._pending = ChangeLog()
        self._affected: set[str] | None = None  # the public keys the last fold touched (None: everything)
        self._verify_next = True  # the next plan is made against the device as read
        # What the device was last given (kept up to date change by change, never copied on the common path).
        self._applied_interface: InterfaceSpec | None = None
        self._applied_aggregates: tuple[str, ...] = ()
        self._applied_peers: dict[str, PeerSpec] = {}
        self._applied_names: dict[str, str] = {}

    def note(self, changes: Changes) -> None:
        """The observe stage saw ``changes``: the next fold takes them in."""
        self._pending.add(changes)

    def verify_next(self) -> None:
        """The device may differ from what it was given (a resync, a new data plane): compare everything next."""
        self._verify_next = True

    def set_auto_mtu(self, auto_mtu: int) -> bool:
        """The underlay's MTU changed (``model.auto_mtu`` of it): with ``mtu: auto`` the device follows in the next
        pass. Whether the device's MTU changes."""
        if not self._builder.set_auto_mtu(auto_mtu):
            return False
        self._verify_next = True
        return True

    def set_public_key(self, public_key: str, view: MeshReader) -> None:
        """This node's key changed (key rotation): fold again around it; the next plan installs it."""
        self._builder.set_local(dataclasses.replace(self._builder.local, public_key=public_key), view)
        self._verify_next = True

    def set_holdings(
        self, overlay_ips: tuple[IPAddress, ...], subnets: tuple[IPNetwork, ...], view: MeshReader
    ) -> None:
        """This node's addresses or pod subnets changed (the mesh gained a family): fold again around them; the
        next plan gives the device its new address."""
        local = dataclasses.replace(self._builder.local, overlay_ips=overlay_ips, allowed_ips=subnets)
        self._builder.set_local(local, view)
        self._verify_next = True

    @property
    def local(self) -> LocalNode:
        return self._builder.local

    @property
    def peer_names(self) -> Mapping[str, str]:
        """Public key -> node or MeshPeer name, as last given to the device. The metrics thread only looks keys up
        in it (safe while the loop changes it); it never iterates."""
        return self._applied_names

    @property
    def peer_count(self) -> int:
        return len(self._builder.peers)

    @property
    def nodes_taken(self) -> int:
        return self._builder.nodes_taken

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        return self._builder.conflicts

    @property
    def unreachable(self) -> tuple[str, ...]:
        return self._builder.unreachable

    @property
    def paths(self) -> Paths | None:
        return self._builder.paths

    @property
    def path_summary(self) -> PathSummary | None:
        return self._builder.path_summary

    @property
    def rebuilds(self) -> int:
        """How often the topology was folded from scratch rather than updated (benchmarks read it)."""
        return self._builder.rebuilds

    def fold(self, view: MeshReader) -> Fold:
        """Take in what changed since the last fold. Until the pass that follows reports success (``settle``), the
        device may differ from what it was given: the next plan looks at it."""
        changes = self._pending.take()
        self._affected = self._builder.update(view, changes)
        needs_device = self._verify_next or self._applied_interface is None or self._affected is None
        self._verify_next = True
        return Fold(needs_device, changes.published)

    def decide(self, device: DeviceState | None, *, remove_unknown: bool) -> Decision:
        """The plan from ``device`` as read (when ``fold`` said it needs it) or else from what the device was last
        given; what the plan gives the device counts as given from now on."""
        builder = self._builder
        if device is not None:
            desired = builder.topology()
            previous = None
            if self._applied_interface is not None:
                previous = Topology(
                    self._applied_interface,
                    self._applied_peers,
                    self._applied_names,
                    aggregates=self._applied_aggregates,
                )
            plan = plan_changes(
                desired,
                device,
                local_public_key=builder.local.public_key,
                previous=previous,
                remove_unknown=remove_unknown,
            )
            names = {**self._applied_names, **desired.names}
            self._applied_interface = desired.interface
            self._applied_aggregates = desired.aggregates
            self._applied_peers = dict(desired.peers)
            self._applied_names = dict(desired.names)
            return Decision(plan, names, full=True, mtu=desired.interface.mtu)
        affected, interface = self._affected, self._applied_interface
        if affected is None or interface is None:
            raise RuntimeError("a delta plan needs a fold that touched single records after a full one")
        plan = plan_delta(
            self._applied_peers,
            builder.peers,
            affected,
            interface_addresses=interface.addresses,
            aggregates=self._applied_aggregates,
            route_changes=builder.route_changes,
        )
        names = {k: n for k in affected if (n := builder.names.get(k) or self._applied_names.get(k))}
        for change in plan.changes:
            if change.action == "remove":
                self._applied_peers.pop(change.public_key, None)
                self._applied_names.pop(change.public_key, None)
            else:
                self._applied_peers[change.public_key] = change.spec
                self._applied_names[change.public_key] = builder.names[change.public_key]
        return Decision(plan, names, full=False, mtu=interface.mtu)

    def settle(self, *, ok: bool) -> None:
        """The plan was carried out; ``ok``: every operation succeeded (else the next plan looks at the device)."""
        self._verify_next = not ok
