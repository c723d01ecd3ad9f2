"""The smallest set of device changes that turns the device as it is into the device as it should be.

Peers are compared one by one and only those that differ are touched: replacing the whole peer list (as Kilo
does) would drop every live session on each change. Peers the device has but the mesh does not are removed only
once the caller knows the mesh completely (``remove_unknown``), so an agent that restarts next to a live device
does not strip it bare before its first snapshot arrives.

WireGuard updates a peer's endpoint itself when the peer roams (NAT rebinding). An endpoint that differs from
what we last asked for is therefore roaming, not drift, and is left alone unless the record itself changed.

Removals come first: when allowed IPs move from one peer to another in one plan, removing the old holder after
the new one was set would take the moved networks' routes with it.

``plan_changes`` compares with the device as read; ``plan_delta`` compares the topology last applied with the
new one for the peers a change touched, without reading the device (a full read costs O(peers) in netlink or
UAPI on every event). The agent uses the delta while it knows the device to be as it left it, and a full
comparison at start, after any failure, after a data-plane restart and on every periodic resync.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from warren_mesh.device import DeviceState, InterfaceSpec, PeerSpec
from warren_mesh.mesh.topology import Topology

PeerAction = Literal["add", "update", "remove"]


@dataclass(frozen=True, slots=True)
class PeerChange:
    action: PeerAction
    public_key: str
    spec: PeerSpec  # what to set; for a removal, what the device had (its routes go too)
    detail: str


@dataclass(frozen=True, slots=True)
class Plan:
    interface: InterfaceSpec | None  # None: the interface is as it should be
    set_private_key: bool
    changes: tuple[PeerChange, ...]

    @property
    def empty(self) -> bool:
        return self.interface is None and not self.set_private_key and not self.changes

    @property
    def size(self) -> int:
        """How many device operations carrying out the plan takes."""
        return (self.interface is not None) + self.set_private_key + len(self.changes)

    def explain(self, names: Mapping[str, str] | None = None) -> str:
        """One line per change, for logs and ``--dry-run`` style output."""
        names = names or {}
        lines = []
        if self.set_private_key:
            lines.append("interface: set private key")
        if self.interface is not None:
            lines.append(
                f"interface: address {self.interface.address}, port {self.interface.listen_port}, "
                f"mtu {self.interface.mtu}"
            )
        for change in self.changes:
            who = names.get(change.public_key, change.public_key[:10] + "…")
            lines.append(f"{change.action} peer {who}: {change.detail}")
        return "\n".join(lines) if lines else "no changes"


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
        changes.append(PeerChange("update", key, want, _difference(have, want)))
    return Plan(interface, device.public_key != local_public_key, tuple(changes))


def plan_delta(applied: Mapping[str, PeerSpec], desired: Mapping[str, PeerSpec], public_keys: Iterable[str]) -> Plan:
    """The peer changes for ``public_keys`` from the peers last applied to the desired ones, the device being as
    it was left (the interface is never part of a delta: a config change makes the caller compare everything)."""
    removals: list[PeerChange] = []
    changes: list[PeerChange] = []
    for key in sorted(public_keys):
        want = desired.get(key)
        before = applied.get(key)
        if want == before:
            continue
        if want is None:
            assert before is not None
            removals.append(PeerChange("remove", key, before, "no longer in the mesh"))
        elif before is None:
            changes.append(PeerChange("add", key, want, _describe(want)))
        else:
            changes.append(PeerChange("update", key, want, _difference(before, want)))
    return Plan(None, False, (*removals, *changes))


def _only_roamed(have: PeerSpec, want: PeerSpec, before: PeerSpec | None) -> bool:
    """The device's endpoint moved on its own while the record's endpoint stayed what we set before."""
    return (
        have.endpoint is not None
        and before is not None
        and before.endpoint == want.endpoint
        and have.allowed_ips == want.allowed_ips
        and have.persistent_keepalive == want.persistent_keepalive
    )


def _describe(spec: PeerSpec) -> str:
    allowed = ",".join(spec.allowed_ips)
    return f"endpoint {spec.endpoint or '-'}, allowed {allowed}, keepalive {spec.persistent_keepalive}"


def _difference(have: PeerSpec, want: PeerSpec) -> str:
    parts = []
    if have.endpoint != want.endpoint:
        parts.append(f"endpoint {have.endpoint or '-'} -> {want.endpoint or '-'}")
    if have.allowed_ips != want.allowed_ips:
        parts.append(f"allowed {','.join(have.allowed_ips)} -> {','.join(want.allowed_ips)}")
    if have.persistent_keepalive != want.persistent_keepalive:
        parts.append(f"keepalive {have.persistent_keepalive} -> {want.persistent_keepalive}")
    return "; ".join(parts)
