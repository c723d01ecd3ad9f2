"""The apply stage's device writer on the memory device: a plan's operations in the plan's order, each counted,
and one refused change never stops the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from unit.stage_parts import LOCAL_KEY
from warren_mesh.agent.device_writer import DeviceWriter
from warren_mesh.agent.identity import Identity
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.plan import PeerChange, Plan
from warren_mesh.values.device import InterfaceSpec, PeerSpec
from warren_mesh.wireguard.backend import BackendError
from warren_mesh.wireguard.memory import MemoryBackend

INTERFACE = InterfaceSpec(addresses=("10.96.0.1/16",), listen_port=51820, mtu=1420)


def _peer(host: int, *networks: str) -> PeerSpec:
    return PeerSpec(
        public_key=NodeKey.generate().public_key,
        endpoint=f"192.0.2.{host}:51820",
        allowed_ips=(f"10.96.0.{host}/32", *networks),
    )


def test_operations_run_in_the_plans_order_and_are_counted_by_kind() -> None:
    leaving, staying, joining = _peer(2, "172.30.0.0/16"), _peer(3), _peer(4, "172.31.0.0/16")
    device = MemoryBackend(interface_name="wgtest", peers={leaving.public_key: leaving, staying.public_key: staying})
    device.routes = {"172.30.0.0/16"}
    plan = Plan(
        INTERFACE,
        True,
        (
            PeerChange("remove", leaving.public_key, leaving, "gone"),
            PeerChange("add", joining.public_key, joining, "new"),
            PeerChange("update", staying.public_key, staying, "same"),
        ),
        routes_to_remove=("172.30.0.0/16",),
        routes_to_add=("172.31.0.0/16",),
    )
    outcome = DeviceWriter(device, Identity(LOCAL_KEY)).execute(plan, {})
    assert outcome.ok and dict(outcome.applied) == {
        "private_key": 1,
        "interface": 1,
        "add": 1,
        "update": 1,
        "add_route": 1,
        "remove": 1,
        "remove_route": 1,
    }
    # Peers are set before their routes come and before others leave; routes leave after their peers.
    assert [op.action for op in device.operations] == [
        "private_key",
        "interface",
        "set_peer",
        "set_peer",
        "add_route",
        "remove_peer",
        "remove_route",
    ]
    assert device.public_key == LOCAL_KEY.public_key and device.routes == {"172.31.0.0/16"}
    assert set(device.peers) == {staying.public_key, joining.public_key}
    assert outcome.added == [joining.public_key], "the peers added, whose first handshakes are watched"


class _Picky(MemoryBackend):
    """Refuses several peers at once, and one peer and one route always."""

    def __init__(self, interface_name: str, refused: set[str] | None = None) -> None:
        super().__init__(interface_name)
        self.refused = refused or set()

    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        raise BackendError(f"refusing {len(specs)} peers at once")

    def set_peer(self, spec: PeerSpec, *, adding: tuple[str, ...] | None = None) -> None:
        if spec.public_key in self.refused:
            raise BackendError("refused")
        super().set_peer(spec, adding=adding)

    def add_route(self, network: str) -> None:
        if network in self.refused:
            raise BackendError("refused")
        super().add_route(network)


def test_a_refused_change_is_counted_and_the_others_still_happen() -> None:
    good, bad = _peer(2, "172.30.0.0/16"), _peer(3, "172.31.0.0/16")
    device = _Picky(interface_name="wgtest", refused={bad.public_key, "172.31.0.0/16"})
    plan = Plan(
        None,
        False,
        (PeerChange("add", good.public_key, good, ""), PeerChange("add", bad.public_key, bad, "")),
        routes_to_add=("172.30.0.0/16", "172.31.0.0/16"),
    )
    outcome = DeviceWriter(device, Identity(LOCAL_KEY)).execute(plan, {})
    assert not outcome.ok and outcome.failed == 2
    assert dict(outcome.applied) == {"add": 1, "add_route": 1}
    assert set(device.peers) == {good.public_key} and device.routes == {"172.30.0.0/16"}
    assert outcome.added == [good.public_key], "a peer the device refused was not added"


def test_an_empty_plan_touches_nothing() -> None:
    device = MemoryBackend(interface_name="wgtest")
    outcome = DeviceWriter(device, Identity(LOCAL_KEY)).execute(Plan(None, False, ()), {})
    assert outcome.ok and not outcome.applied and not device.operations


def test_networks_added_to_peers_reach_the_device_as_additions_whether_set_together_or_one_by_one() -> None:
    """The device adds them to what the peer has (a network put there by someone else stays, as on a real device)
    instead of replacing the peer's allowed IPs."""
    first, second = _peer(2), _peer(3)
    for device in (
        MemoryBackend(interface_name="wgtest"),
        _Picky(interface_name="wgtest"),  # refuses peers together: one by one
    ):
        device.peers = {
            first.public_key: first,
            second.public_key: PeerSpec(second.public_key, second.endpoint, (*second.allowed_ips, "172.16.0.0/24")),
        }
        changes = tuple(
            PeerChange("update", p.public_key, PeerSpec(p.public_key, p.endpoint, (*p.allowed_ips, v6)), "", (v6,))
            for p, v6 in ((first, "fd96::2/128"), (second, "fd96::3/128"))
        )
        assert DeviceWriter(device, Identity(LOCAL_KEY)).execute(Plan(None, False, changes), {}).ok
        assert device.peers[first.public_key].allowed_ips == ("10.96.0.2/32", "fd96::2/128")
        assert device.peers[second.public_key].allowed_ips == ("10.96.0.3/32", "172.16.0.0/24", "fd96::3/128")


def test_the_memory_device_adds_networks_to_what_it_has_whatever_the_caller_believed() -> None:
    """The memory device keeps each grown peer's networks as a list the next additions go into (no copy of a
    gateway's thousands per join), and what it shows is what it has: a caller that believed the peer had other
    networks (as many) is shown the device's, not its belief."""
    device = MemoryBackend(interface_name="wgtest")
    peer = PeerSpec(_peer(2).public_key, "192.0.2.2:51820", ("10.96.0.1/32", "10.96.0.4/32"))
    device.set_peer(peer)
    believed = PeerSpec(peer.public_key, peer.endpoint, ("10.96.0.1/32", "10.96.0.2/32", "10.96.0.3/32"))
    device.set_peer(believed, adding=("10.96.0.3/32",))
    assert device.peers[peer.public_key].allowed_ips == ("10.96.0.1/32", "10.96.0.3/32", "10.96.0.4/32")
    # Additions that match what the caller holds are taken as given, one after another, and read back whole.
    for host in range(5, 50):
        networks = tuple(sorted((*device.peers[peer.public_key].allowed_ips, f"10.96.0.{host}/32")))
        device.set_peer(PeerSpec(peer.public_key, peer.endpoint, networks), adding=(f"10.96.0.{host}/32",))
    expected = tuple(sorted(f"10.96.0.{host}/32" for host in (1, 3, *range(4, 50))))
    assert device.read().peers[peer.public_key].allowed_ips == expected
    # A replacement drops what was added.
    device.set_peer(peer)
    assert device.peers[peer.public_key].allowed_ips == peer.allowed_ips
