"""The pure mesh logic: folding watch results, settling conflicts, and planning minimal device changes."""

from __future__ import annotations

import ipaddress
import json

from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.changes import Rejection
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.plan import desired_routes, plan_changes, plan_delta
from warren_mesh.mesh.topology import build_topology
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import MeshConfig, NodeRecord, encode_json
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot

SCHEMA = KeySchema("/t")
KEYS = {name: NodeKey.generate().public_key for name in ("local", "a", "b", "c", "d")}
LOCAL = LocalNode("local", KEYS["local"], (ipaddress.ip_address("10.96.0.1"),))


def record(name: str, address: str, *, key: str | None = None, extra: tuple[str, ...] = (), port: int = 51820) -> bytes:
    rec = NodeRecord(
        name=name,
        public_key=key or KEYS[name],
        endpoints=(Endpoint(ipaddress.ip_address("192.0.2.10"), port),),
        overlay_ips=(ipaddress.ip_address(address),),
        listen_port=51820,
        allowed_ips=tuple(ipaddress.ip_network(n) for n in extra),
        published_at=1.0,
    )
    return encode_json(rec.to_json())


def kv(key: str, value: bytes, revision: int, create: int | None = None) -> KeyValue:
    return KeyValue(key, value, create or revision, revision, lease=7)


def topology_of(view: MeshView) -> Topology:
    return build_topology(local=LOCAL, view=view, auto_mtu=1420)


def test_snapshot_then_events_build_the_same_view() -> None:
    view = MeshView(SCHEMA)
    view.apply(Snapshot((kv(SCHEMA.node("a"), record("a", "10.96.0.2"), 5),), 5))
    view.apply(Events((Event("put", kv(SCHEMA.node("b"), record("b", "10.96.0.3"), 6)),), 6))
    assert set(view.nodes) == {"a", "b"} and view.synced and view.revision == 6
    view.apply(Events((Event("delete", kv(SCHEMA.node("a"), b"", 7)),), 7))
    assert set(view.nodes) == {"b"}
    # A snapshot after a compaction replaces what is gone.
    view.apply(Snapshot((kv(SCHEMA.node("c"), record("c", "10.96.0.4"), 9),), 9))
    assert set(view.nodes) == {"c"}


def test_bad_update_keeps_the_last_valid_record_and_reports_once() -> None:
    rejected: list[Rejection] = []
    view = MeshView(SCHEMA)
    rejected += view.apply(Snapshot((kv(SCHEMA.node("a"), record("a", "10.96.0.2"), 5),), 5)).rejections
    rejected += view.apply(Events((Event("put", kv(SCHEMA.node("a"), b"{broken", 6, create=5)),), 6)).rejections
    assert view.nodes["a"].record.overlay_ip == ipaddress.ip_address("10.96.0.2")
    # The same bad version seen again in a later snapshot is not reported twice.
    rejected += view.apply(Snapshot((kv(SCHEMA.node("a"), b"{broken", 6, create=5),), 8)).rejections
    assert [r.reason for r in rejected] == ["invalid_json"]
    assert "a" in view.nodes


def test_a_rejected_key_going_away_or_turning_valid_is_a_change() -> None:
    """The count of invalid records a pass reports falls: the batch that made it fall is one a pass must follow,
    though no record of the mesh changed; a key of a newer schema is not."""
    view = MeshView(SCHEMA)
    view.apply(Snapshot((), 1))
    assert view.apply(Events((Event("put", kv(SCHEMA.node("b"), b"{broken", 2)),), 2)).anything
    assert view.rejected_by_reason() == {"invalid_json": 1}
    gone = view.apply(Events((Event("delete", kv(SCHEMA.node("b"), b"", 3)),), 3))
    assert gone.cleared_rejections and gone.anything and view.rejected_by_reason() == {}
    assert not view.apply(Events((Event("put", kv(SCHEMA.node("c"), b"{broken", 4)),), 4)).cleared_rejections
    fixed = view.apply(Events((Event("put", kv(SCHEMA.node("c"), record("c", "10.96.0.3"), 5, create=4)),), 5))
    assert fixed.cleared_rejections and view.rejected_by_reason() == {}
    assert not view.apply(Events((Event("put", kv(SCHEMA.root + "future/x", b"x", 6)),), 6)).anything


def test_bad_config_keeps_the_previous_config() -> None:
    view = MeshView(SCHEMA)
    good = encode_json(MeshConfig(mtu=1400).to_json())
    view.apply(Snapshot((kv(SCHEMA.config, good, 2),), 2))
    bad = json.dumps({"schema": 1, "mtu": 5}).encode()
    rejected = view.apply(Events((Event("put", kv(SCHEMA.config, bad, 3)),), 3)).rejections
    assert view.config.mtu == 1400
    assert [r.reason for r in rejected] == ["invalid_config"]


def test_unknown_keys_are_ignored() -> None:
    view = MeshView(SCHEMA)
    view.apply(Snapshot((kv("/t/v2/nodes/x", b"whatever", 2), kv("/t/v1/other", b"?", 3)), 3))
    assert not view.nodes


def test_topology_excludes_self_and_builds_peers() -> None:
    view = MeshView(SCHEMA)
    view.apply(
        Snapshot(
            (
                kv(SCHEMA.node("local"), record("local", "10.96.0.1"), 2),
                kv(SCHEMA.node("a"), record("a", "10.96.0.2", extra=("10.244.0.0/24",)), 3),
                kv(SCHEMA.claim("a", "10.244.0.0/24", "pods"), b"", 3),
            ),
            3,
        )
    )
    topo = topology_of(view)
    assert topo.interface == InterfaceSpec(("10.96.0.1/16",), 51820, 1420)
    assert list(topo.peers) == [KEYS["a"]]
    assert topo.peers[KEYS["a"]].allowed_ips == ("10.244.0.0/24", "10.96.0.2/32")
    assert topo.names[KEYS["a"]] == "a"


def test_conflicts_resolve_by_create_revision() -> None:
    view = MeshView(SCHEMA)
    view.apply(
        Snapshot(
            (
                kv(SCHEMA.node("a"), record("a", "10.96.0.2", extra=("10.244.1.0/24",)), 10),
                kv(SCHEMA.claim("a", "10.244.1.0/24", "pods"), b"", 10),
                # b reuses a's key but registered later: left out
                kv(SCHEMA.node("b"), record("b", "10.96.0.3", key=KEYS["a"]), 11),
                # c claims a's pod subnet too, later: left out (it would steal a's traffic)
                kv(SCHEMA.node("c"), record("c", "10.96.0.4", extra=("10.244.1.0/24",)), 12),
                kv(SCHEMA.claim("c", "10.244.1.0/24", "pods"), b"", 12),
                # d claims an address reserved for someone else
                kv(SCHEMA.node("d"), record("d", "10.96.0.5"), 13),
                kv(SCHEMA.claim("somebody-else", "10.96.0.5"), b"", 4),
            ),
            13,
        )
    )
    topo = topology_of(view)
    assert set(topo.peers) == {KEYS["a"]}
    assert {(c.name, c.reason) for c in topo.conflicts} == {
        ("b", "duplicate_public_key"),
        ("c", "address_taken"),
        ("d", "address_taken"),
    }


def test_a_record_claiming_our_address_or_outside_the_cidr_is_left_out() -> None:
    view = MeshView(SCHEMA)
    view.apply(
        Snapshot(
            (
                kv(SCHEMA.node("a"), record("a", "10.96.0.1"), 3),
                kv(SCHEMA.node("b"), record("b", "172.16.0.9"), 4),
                kv(SCHEMA.node("c"), record("c", "10.96.0.3", extra=("172.16.0.0/12",)), 5),
                # a node may route its overlay address and pod networks to itself, nothing else
                kv(SCHEMA.node("d"), record("d", "10.96.0.4", extra=("10.96.0.9/32",)), 6),
            ),
            6,
        )
    )
    topo = topology_of(view)
    assert not topo.peers
    assert {(c.name, c.reason) for c in topo.conflicts} == {
        ("a", "overlapping_allowed_ips"),
        ("b", "address_outside_cidr"),
        ("c", "network_not_owned"),
        ("d", "network_not_owned"),
    }


def _device(topo: Topology, peers: dict[str, PeerSpec] | None = None) -> DeviceState:
    """The device as configured for ``topo`` (routes included), with ``peers`` instead of its peers if given."""
    peers = dict(topo.peers) if peers is None else peers
    return DeviceState(LOCAL.public_key, topo.interface, peers, routes=frozenset(desired_routes(topo)))


def test_plan_touches_only_what_differs() -> None:
    view = MeshView(SCHEMA)
    view.apply(Snapshot((kv(SCHEMA.node("a"), record("a", "10.96.0.2"), 3),), 3))
    before = topology_of(view)
    assert plan_changes(before, _device(before), local_public_key=LOCAL.public_key).empty
    view.apply(Events((Event("put", kv(SCHEMA.node("b"), record("b", "10.96.0.3"), 4)),), 4))
    after = topology_of(view)
    plan = plan_changes(after, _device(before), local_public_key=LOCAL.public_key, previous=before)
    assert [(c.action, c.public_key) for c in plan.changes] == [("add", KEYS["b"])]
    assert plan.interface is None and not plan.set_private_key
    # An endpoint change of a updates a alone.
    view.apply(Events((Event("put", kv(SCHEMA.node("a"), record("a", "10.96.0.2", port=6000), 5, create=3)),), 5))
    moved = topology_of(view)
    plan = plan_changes(moved, _device(after), local_public_key=LOCAL.public_key, previous=after)
    assert [(c.action, c.public_key) for c in plan.changes] == [("update", KEYS["a"])]
    assert "endpoint 192.0.2.10:51820 -> 192.0.2.10:6000" in plan.explain(moved.names)


def test_plan_removes_unknown_peers_only_once_synced() -> None:
    view = MeshView(SCHEMA)
    view.apply(Snapshot((), 1))
    topo = topology_of(view)
    stranger = PeerSpec(KEYS["d"], "192.0.2.99:1", ("10.96.9.9/32",), 0)
    device = _device(topo, {KEYS["d"]: stranger})
    assert not plan_changes(topo, device, local_public_key=LOCAL.public_key, remove_unknown=False).changes
    plan = plan_changes(topo, device, local_public_key=LOCAL.public_key)
    assert [(c.action, c.public_key) for c in plan.changes] == [("remove", KEYS["d"])]


def test_roamed_endpoint_is_left_alone() -> None:
    view = MeshView(SCHEMA)
    view.apply(Snapshot((kv(SCHEMA.node("a"), record("a", "10.96.0.2"), 3),), 3))
    topo = topology_of(view)
    roamed = {
        k: PeerSpec(v.public_key, "198.51.100.7:40000", v.allowed_ips, v.persistent_keepalive)
        for k, v in topo.peers.items()
    }
    assert plan_changes(topo, _device(topo, roamed), local_public_key=LOCAL.public_key, previous=topo).empty
    # Without knowing what we set before (fresh start), the record's endpoint is applied.
    assert not plan_changes(topo, _device(topo, roamed), local_public_key=LOCAL.public_key).empty


def test_routes_are_planned_like_peers() -> None:
    view = MeshView(SCHEMA)
    a_claims = kv(SCHEMA.claim("a", "10.244.1.0/24", "pods"), b"", 3)
    site = {"schema": 1, "name": "site", "public_key": KEYS["d"], "allowed_ips": ["172.30.0.0/16"]}
    view.apply(
        Snapshot(
            (
                kv(SCHEMA.node("a"), record("a", "10.96.0.2", extra=("10.244.1.0/24",)), 3),
                a_claims,
                kv(SCHEMA.peer("site"), json.dumps(site).encode(), 4),
            ),
            4,
        )
    )
    desired = topology_of(view)
    # a's overlay /32 is reached through the interface's own /16, its pod subnet through the pod network's one
    # route; the site's network, outside both, gets a route of its own.
    assert desired.aggregates == ("10.244.0.0/16",)
    fresh = plan_changes(desired, DeviceState(LOCAL.public_key, desired.interface), local_public_key=LOCAL.public_key)
    assert fresh.routes_to_add == ("10.244.0.0/16", "172.30.0.0/16") and fresh.routes_to_remove == ()
    # A mesh route deleted by hand is added again; a stale one goes; nothing else is touched.
    drifted = DeviceState(
        LOCAL.public_key, desired.interface, dict(desired.peers), routes=frozenset({"10.244.0.0/16", "10.244.9.0/24"})
    )
    plan = plan_changes(desired, drifted, local_public_key=LOCAL.public_key, previous=desired)
    assert (plan.routes_to_add, plan.routes_to_remove, plan.changes) == (("172.30.0.0/16",), ("10.244.9.0/24",), ())
    assert "add route 172.30.0.0/16" in plan.explain() and len(plan.operations()) == 2
    # Before the first complete view, nothing is removed: routes as peers.
    early = plan_changes(desired, drifted, local_public_key=LOCAL.public_key, remove_unknown=False)
    assert early.routes_to_remove == ()


def test_a_pod_network_over_the_underlay_or_etcd_is_routed_subnet_by_subnet() -> None:
    """One route for the whole pod network would take this node's way to etcd or its peers into the tunnel."""
    view = MeshView(SCHEMA)
    a_claims = kv(SCHEMA.claim("a", "10.244.1.0/24", "pods"), b"", 3)
    view.apply(Snapshot((kv(SCHEMA.node("a"), record("a", "10.96.0.2", extra=("10.244.1.0/24",)), 3), a_claims), 3))
    etcd_inside = LocalNode(
        LOCAL.name, LOCAL.public_key, LOCAL.overlay_ips, protected=(ipaddress.ip_network("10.244.200.5/32"),)
    )
    desired = build_topology(local=etcd_inside, view=view, auto_mtu=1420)
    assert desired.aggregates == ()
    fresh = plan_changes(desired, DeviceState(LOCAL.public_key, desired.interface), local_public_key=LOCAL.public_key)
    assert fresh.routes_to_add == ("10.244.1.0/24",)


def test_a_delta_removes_the_route_of_a_network_a_peer_gave_up() -> None:
    view = MeshView(SCHEMA)
    a_claims = kv(SCHEMA.claim("a", "10.244.1.0/24", "pods"), b"", 3)
    view.apply(Snapshot((kv(SCHEMA.node("a"), record("a", "10.96.0.2", extra=("10.244.1.0/24",)), 3), a_claims), 3))
    before = topology_of(view)
    view.apply(Events((Event("put", kv(SCHEMA.node("a"), record("a", "10.96.0.2"), 4, create=3)),), 4))
    after = topology_of(view)
    key = KEYS["a"]
    # Routed subnet by subnet (no aggregate route: e.g. the pod network covers etcd's address), the route goes.
    delta = plan_delta(before.peers, after.peers, {key}, interface_addresses=after.interface.addresses)
    assert delta.routes_to_remove == ("10.244.1.0/24",) and delta.routes_to_add == ()
    assert [(c.action, c.public_key) for c in delta.changes] == [("update", key)]
    # Under the pod network's one route, the subnet never had a route of its own: only the peer changes.
    covered = plan_delta(
        before.peers, after.peers, {key}, interface_addresses=after.interface.addresses, aggregates=after.aggregates
    )
    assert covered.routes_to_remove == () and covered.routes_to_add == ()
    assert [(c.action, c.public_key) for c in covered.changes] == [("update", key)]


def test_a_logged_change_names_what_changed_not_every_network_a_gateway_carries() -> None:
    """A gateway's peer carries every node of the other locations: its log line says which networks came or went
    and how many there are, not the thousands it holds (a ~300 KB line per join at 10,000 nodes)."""
    key = KEYS["a"]
    carried = tuple(f"10.96.{i // 250}.{i % 250 + 1}/32" for i in range(1000))
    before = PeerSpec(key, "192.0.2.1:51820", carried[:999], 25)
    after = PeerSpec(key, "192.0.2.1:51820", carried[1:], 25)
    line = plan_delta({key: before}, {key: after}, {key}, interface_addresses=("10.96.0.1/16",)).explain({key: "ga"})
    assert line == "update peer ga: allowed +10.96.3.250/32 -10.96.0.1/32 (999 in all)"
    added = plan_delta({}, {key: after}, {key}, interface_addresses=("10.96.0.1/16",)).explain({key: "ga"})
    assert added.startswith("add peer ga: endpoint 192.0.2.1:51820, allowed 10.96.0.2/32,10.96.0.3/32,")
    assert added.endswith("10.96.0.5/32 and 995 more, keepalive 25")
    assert len(line) < 100 and len(added) < 150


def test_allowed_ips_that_only_grow_are_added_to_the_peers_not_replaced() -> None:
    """Replacing a peer's allowed IPs empties them for a moment on the device: a packet from that peer decrypted
    then fails WireGuard's source check and is dropped (1 of 1,600 datagrams, seen while a mesh gained IPv6). A set
    that only grows is written as its additions; one that loses a network is replaced."""
    key = KEYS["a"]
    v4 = PeerSpec(key, "192.0.2.1:51820", ("10.244.1.0/24", "10.96.0.2/32"), 0)
    dual = PeerSpec(key, "192.0.2.1:51820", ("10.244.1.0/24", "10.96.0.2/32", "fd96::2/128"), 0)
    moved = PeerSpec(key, "192.0.2.1:6000", v4.allowed_ips, 0)
    for plan in (
        plan_delta({key: v4}, {key: dual}, {key}, interface_addresses=("10.96.0.1/16",)),
        plan_changes(_topology_with(dual), _device_with(v4), local_public_key=LOCAL.public_key),
    ):
        assert [(c.action, c.adding) for c in plan.changes] == [("update", ("fd96::2/128",))]
    shrunk = plan_delta({key: dual}, {key: v4}, {key}, interface_addresses=("10.96.0.1/16",))
    swapped = PeerSpec(key, "192.0.2.1:51820", ("10.244.2.0/24", "10.96.0.2/32"), 0)
    changed = plan_delta({key: v4}, {key: swapped}, {key}, interface_addresses=("10.96.0.1/16",))
    assert [c.adding for c in (*shrunk.changes, *changed.changes)] == [None, None]
    # An endpoint alone leaves the allowed IPs untouched: nothing to add, nothing replaced.
    endpoint_only = plan_delta({key: v4}, {key: moved}, {key}, interface_addresses=("10.96.0.1/16",))
    assert [c.adding for c in endpoint_only.changes] == [()]
    # A new peer has nothing to keep.
    assert [c.adding for c in plan_delta({}, {key: v4}, {key}, interface_addresses=()).changes] == [None]


def _topology_with(peer: PeerSpec) -> Topology:
    topo = topology_of(MeshView(SCHEMA))
    return Topology(topo.interface, {peer.public_key: peer}, topo.names)


def _device_with(peer: PeerSpec) -> DeviceState:
    topo = _topology_with(peer)
    return DeviceState(LOCAL.public_key, topo.interface, {peer.public_key: peer})
