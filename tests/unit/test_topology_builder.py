"""The agent's incremental fold must always equal a fold from scratch, whatever the order of changes."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.plan import Plan, desired_routes, plan_changes, plan_delta
from warren_mesh.mesh.topology import TopologyBuilder, build_topology
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import ExternalPeer, MeshConfig, NodeRecord, auto_mtu, encode_json
from warren_mesh.values.device import DeviceState, PeerSpec
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot

SCHEMA = KeySchema("/t")
KEYS = [NodeKey.generate().public_key for _ in range(10)]
LOCAL = LocalNode("local", KEYS[0], (ipaddress.ip_address("10.96.0.1"),))
# Small pools, so that names, keys, addresses and networks collide often.
NAMES = [f"n{i}" for i in range(14)] + ["local"]
ADDRESSES = [f"10.96.0.{i}" for i in range(1, 9)] + ["10.97.0.5"]
NETWORKS = ["10.200.0.0/24", "10.200.0.0/16", "10.244.1.0/24", "10.244.0.0/16", "192.168.7.0/24", "fd00::/64"]


def _node_value(rng: random.Random, name: str, *, located: bool = False) -> bytes:
    public_key = rng.choice(KEYS)
    # Now and then a node in the middle of a key rotation: its next key announced (colliding as keys do here).
    next_key = rng.choice([None, None, None, *KEYS])
    record = NodeRecord(
        name=name,
        public_key=public_key,
        next_public_key=None if next_key == public_key else next_key,
        endpoints=(Endpoint(ipaddress.ip_address("192.0.2.1"), rng.choice([51820, 51821])),),
        overlay_ips=(ipaddress.ip_address(rng.choice(ADDRESSES)),),
        listen_port=51820,
        allowed_ips=tuple(ipaddress.ip_network(n) for n in rng.sample(NETWORKS, rng.choice([0, 0, 1, 2]))),
        published_at=1.0,
        # Paths in play (mesh/paths.py): locations, gateways' external endpoints, pairs that cannot talk directly.
        location=rng.choice([None, "a", "b", "b"]) if located else None,
        external_endpoints=(Endpoint(ipaddress.ip_address("198.51.100.1"), 51820),)
        if located and rng.random() < 0.5
        else (),
        unreachable=tuple(rng.sample(NAMES, rng.choice([0, 0, 1, 3]))) if located else (),
    )
    return encode_json(record.to_json())


def _peer_value(rng: random.Random, name: str) -> bytes:
    peer = ExternalPeer(
        name=name,
        public_key=rng.choice(KEYS),
        allowed_ips=tuple(
            ipaddress.ip_network(n) for n in rng.sample([*NETWORKS, "10.96.0.3/32", "10.96.0.5/32"], rng.choice([1, 2]))
        ),
        endpoint=None,
    )
    return encode_json(peer.to_json())


class _Etcd:
    """Just enough of etcd's revision bookkeeping to produce realistic watch events."""

    def __init__(self) -> None:
        self.revision = 1
        self.data: dict[str, KeyValue] = {}

    def put(self, key: str, value: bytes) -> Event:
        self.revision += 1
        current = self.data.get(key)
        create = current.create_revision if current is not None else self.revision
        self.data[key] = KeyValue(key, value, create, self.revision, lease=0)
        return Event("put", self.data[key])

    def delete(self, key: str) -> Event | None:
        if key not in self.data:
            return None
        self.revision += 1
        del self.data[key]
        return Event("delete", KeyValue(key, b"", 0, self.revision, lease=0))


def _random_event(rng: random.Random, etcd: _Etcd, *, located: bool) -> Event | None:
    roll = rng.random()
    name = rng.choice(NAMES)
    if located and rng.random() < 0.1:
        candidacy = f"{SCHEMA.claims_of(name)}gateway/{rng.choice(['a', 'b'])}"
        return etcd.put(candidacy, b"") if rng.random() < 0.6 else etcd.delete(candidacy)
    if roll < 0.45:
        return etcd.put(SCHEMA.node(name), _node_value(rng, name, located=located))
    if roll < 0.65:
        return etcd.delete(SCHEMA.node(name)) if rng.random() < 0.8 else etcd.delete(SCHEMA.peer(name))
    if roll < 0.75:
        return etcd.put(SCHEMA.peer(name), _peer_value(rng, name))
    if roll < 0.88:
        return etcd.put(SCHEMA.claim(rng.choice(NAMES), rng.choice(ADDRESSES[:-1])), b"")
    if roll < 0.92:
        return etcd.delete(SCHEMA.claim(rng.choice(NAMES), rng.choice(ADDRESSES[:-1])))
    if roll < 0.94:
        return etcd.put(SCHEMA.legacy_reservation(rng.choice(ADDRESSES[:-1])), rng.choice(NAMES).encode())
    if roll < 0.96:
        return etcd.delete(SCHEMA.legacy_reservation(rng.choice(ADDRESSES[:-1])))
    if roll < 0.98:
        return etcd.put(SCHEMA.config, encode_json(MeshConfig(persistent_keepalive=rng.choice([0, 25])).to_json()))
    return etcd.put(SCHEMA.node(name), b"{not json")  # rejected: the last valid record stays


def _located(etcd: _Etcd, key: str, i: int, name: str, location: str, *, subnets: tuple[str, ...] = ()) -> list[Event]:
    """Node ``name`` joining at location ``location`` (a gateway candidate with an external endpoint if its name
    starts with g): its claim on 10.96.0.<i+1>, its candidacy, its record."""
    record = NodeRecord(
        name=name,
        public_key=key,
        endpoints=(Endpoint(ipaddress.ip_address("192.0.2.1"), 51820 + i),),
        overlay_ips=(ipaddress.ip_address(f"10.96.0.{i + 1}"),),
        listen_port=51820,
        allowed_ips=tuple(ipaddress.ip_network(n) for n in subnets),
        published_at=1.0,
        location=location,
        external_endpoints=(Endpoint(ipaddress.ip_address("198.51.100.1"), 51820 + i),) if name[0] == "g" else (),
    )
    events = [etcd.put(SCHEMA.claim(name, f"10.96.0.{i + 1}"), b"")]
    if name[0] == "g":
        events.append(etcd.put(SCHEMA.candidacy(name, location), b""))
    return [*events, etcd.put(SCHEMA.node(name), encode_json(record.to_json()))]


@pytest.mark.parametrize("located", [False, True], ids=["flat", "located"])
@pytest.mark.parametrize("seed", range(40))
def test_incremental_fold_equals_a_fold_from_scratch(seed: int, located: bool) -> None:
    """``located``: with locations, gateway candidacies and unreachable peers, so that paths are in play."""
    rng = random.Random(seed)
    etcd = _Etcd()
    view = MeshView(SCHEMA)
    changes = view.apply(Snapshot((), etcd.revision))
    builder = TopologyBuilder(LOCAL, auto_mtu=1420)
    builder.update(view, changes)
    previous = builder.topology()
    routed = 0  # steps with paths in play
    for step in range(300):
        if rng.random() < 0.01:
            changes = view.apply(Snapshot(tuple(etcd.data.values()), etcd.revision))  # a re-list after a compaction
        else:
            batch = range(rng.choice([1, 1, 1, 2, 4]))
            events = [e for e in (_random_event(rng, etcd, located=located) for _ in batch) if e]
            if not events:
                continue
            changes = view.apply(Events(tuple(events), etcd.revision))
        affected = builder.update(view, changes)
        current = builder.topology()
        expected = build_topology(local=LOCAL, view=view, auto_mtu=1420)
        assert current == expected, f"seed {seed}, step {step}"
        routed += current.paths is not None
        if affected is not None:
            # The delta plan must reach exactly the device a full comparison reaches.
            device = DeviceState(
                LOCAL.public_key, previous.interface, dict(previous.peers), routes=frozenset(desired_routes(previous))
            )
            full = plan_changes(current, device, local_public_key=LOCAL.public_key, previous=previous)
            delta = _delta(builder, previous, current, affected)
            assert _applied(previous, delta) == _applied(previous, full) == dict(current.peers)
            # The networks the paths say a kept peer gained and lost are exactly what changed on it.
            _check_route_changes(builder, previous, current)
            # Routes too: the delta reaches the routes a full comparison reaches, and those are the desired ones.
            routes = desired_routes(previous)
            after_delta = (routes - set(delta.routes_to_remove)) | set(delta.routes_to_add)
            after_full = (routes - set(full.routes_to_remove)) | set(full.routes_to_add)
            assert after_delta == after_full == desired_routes(current)
        previous = current
    assert builder.rebuilds < 300, "every change needed a fold from scratch"
    assert (routed > 50) if located else (routed == 0), routed


def _delta(builder: TopologyBuilder, previous: Topology, current: Topology, affected: set[str]) -> Plan:
    """The agent's delta plan from ``previous`` to ``current``, with the route changes the builder worked out."""
    return plan_delta(
        previous.peers,
        current.peers,
        affected,
        interface_addresses=current.interface.addresses,
        route_changes=builder.route_changes,
    )


def _check_route_changes(builder: TopologyBuilder, previous: Topology, current: Topology) -> int:
    """The networks the paths say a kept peer gained and lost are exactly what changed on it; how many peers."""
    for key, (added, removed) in builder.route_changes.items():
        was, now = set(previous.peers[key].allowed_ips), set(current.peers[key].allowed_ips)
        assert (set(added), set(removed)) == (now - was, was - now)
        assert added == sorted(added) and removed == sorted(removed)
    return len(builder.route_changes)


@pytest.mark.parametrize("seed", range(20))
def test_nodes_churning_behind_gateways_change_the_gateways_peers_by_what_the_paths_say(seed: int) -> None:
    """mesh/routed_peers.py: plain nodes (a location, no candidacy, nobody they cannot reach) joining, leaving and
    changing their subnets behind three gateways: each fold is incremental, the networks it says a gateway's peer
    gained and lost are exactly the difference, and the plan made from them reaches the device a full comparison
    reaches."""
    rng = random.Random(seed)
    etcd = _Etcd()
    view = MeshView(SCHEMA)
    keys = [NodeKey.generate().public_key for _ in range(24)]
    local = LocalNode("local", keys[0], (ipaddress.ip_address("10.96.0.1"),))
    builder = TopologyBuilder(local, auto_mtu=1420)
    builder.update(view, view.apply(Snapshot((), etcd.revision)))

    def node(i: int, name: str, location: str, subnets: tuple[str, ...] = ()) -> list[Event]:
        return _located(etcd, keys[i], i, name, location, subnets=subnets)

    setup = node(0, "local", "a") + node(1, "ga", "a") + node(2, "gb", "b") + node(3, "gc", "c")
    builder.update(view, view.apply(Events(tuple(setup), etcd.revision)))
    previous, told = builder.topology(), 0
    for step in range(150):
        events: list[Event] = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            i = rng.randrange(4, 24)
            if rng.random() < 0.3:
                gone = etcd.delete(SCHEMA.node(f"n{i}"))
                events += [gone] if gone is not None else []
            else:
                subnets = tuple(f"10.{200 + i}.{j}.0/24" for j in rng.sample(range(4), rng.choice([0, 1, 2])))
                events += node(i, f"n{i}", rng.choice("abc"), subnets)
        rebuilds = builder.rebuilds
        affected = builder.update(view, view.apply(Events(tuple(events), etcd.revision)))
        current = builder.topology()
        assert current == build_topology(local=local, view=view, auto_mtu=1420), f"seed {seed}, step {step}"
        assert affected is not None and builder.rebuilds == rebuilds, "a plain node's change was folded afresh"
        told += _check_route_changes(builder, previous, current)
        delta = _delta(builder, previous, current, affected)
        assert _applied(previous, delta) == dict(current.peers), f"seed {seed}, step {step}"
        previous = current
    assert told > 20, told


def _applied(before: Topology, plan: Plan) -> dict[str, PeerSpec]:
    """The peers a device that held ``before`` holds after ``plan``."""
    peers = dict(before.peers)
    for change in plan.changes:
        if change.action == "remove":
            peers.pop(change.public_key, None)
        elif change.adding is not None:  # added to what the device has, as WireGuard does
            had = peers[change.public_key].allowed_ips
            peers[change.public_key] = dataclasses.replace(
                change.spec, allowed_ips=tuple(sorted({*had, *change.adding}))
            )
        else:
            peers[change.public_key] = change.spec
    return peers


def test_a_join_at_the_end_is_settled_without_folding_again() -> None:
    etcd = _Etcd()
    view = MeshView(SCHEMA)
    changes = view.apply(Snapshot((), etcd.revision))
    builder = TopologyBuilder(LOCAL, auto_mtu=1420)
    builder.update(view, changes)
    for i in range(2, 8):
        name = f"n{i}"
        record = NodeRecord(
            name=name,
            public_key=KEYS[i],
            endpoints=(Endpoint(ipaddress.ip_address("192.0.2.1"), 51820),),
            overlay_ips=(ipaddress.ip_address(f"10.96.0.{i}"),),
            listen_port=51820,
            published_at=1.0,
        )
        reservation = etcd.put(SCHEMA.claim(name, f"10.96.0.{i}"), b"")
        changes = view.apply(
            Events((reservation, etcd.put(SCHEMA.node(name), encode_json(record.to_json()))), etcd.revision)
        )
        assert builder.update(view, changes) == {KEYS[i]}
    leave = etcd.delete(SCHEMA.node("n4"))
    assert leave is not None
    assert builder.update(view, view.apply(Events((leave,), etcd.revision))) == {KEYS[4]}
    assert builder.rebuilds == 1


def test_a_join_in_a_located_mesh_changes_only_its_own_peer_and_its_carrier() -> None:
    """mesh/routed_peers.py: a node that stands for no gateway joining a located mesh touches the peer it becomes
    (its own location) or the gateway that carries it (another one), never the whole device again."""
    etcd = _Etcd()
    view = MeshView(SCHEMA)
    keys = [NodeKey.generate().public_key for _ in range(8)]
    names = ["local", "ga", "gb", "a1", "b1", "a2", "b2"]
    local = LocalNode("local", keys[0], (ipaddress.ip_address("10.96.0.1"),))
    builder = TopologyBuilder(local, auto_mtu=1420)
    builder.update(view, view.apply(Snapshot((), etcd.revision)))

    def join(i: int) -> set[str] | None:
        name = names[i]
        location = "b" if name.startswith(("gb", "b")) else "a"
        events = _located(etcd, keys[i], i, name, location)
        return builder.update(view, view.apply(Events(tuple(events), etcd.revision)))

    for i in range(5):  # local, both gateways (candidacies: worked out afresh), a1, b1
        join(i)
    rebuilds = builder.rebuilds
    assert join(5) == {keys[5]}, "a2 in local's location: its own peer only"
    assert join(6) == {keys[6], keys[1]}, "b2 in the other location: its key (no peer) and its carrier, ga"
    assert builder.rebuilds == rebuilds
    peers = builder.peers
    assert set(peers) == {keys[1], keys[3], keys[5]}
    assert peers[keys[1]].allowed_ips == ("10.96.0.2/32", "10.96.0.3/32", "10.96.0.5/32", "10.96.0.7/32")
    assert builder.topology() == build_topology(local=local, view=view, auto_mtu=1420)


def test_auto_mtu_is_the_underlay_less_wireguards_overhead_for_its_family() -> None:
    assert auto_mtu(1500, 4) == 1440 and auto_mtu(1500, 6) == 1420
    assert auto_mtu(9001, 4) == 8941 and auto_mtu(1400, 4) == 1340


def test_the_device_mtu_follows_the_underlay_unless_the_mesh_sets_one() -> None:
    builder = TopologyBuilder(LOCAL, auto_mtu=1440)
    view = MeshView(SCHEMA)
    view.apply(Snapshot(items=(), revision=1))
    builder.rebuild(view)
    assert builder.topology().interface.mtu == 1440
    assert builder.set_auto_mtu(1340) and builder.topology().interface.mtu == 1340
    assert not builder.set_auto_mtu(1340)
    config = MeshConfig(mtu=1300)
    changes = view.apply(
        Events((Event("put", KeyValue(SCHEMA.config, encode_json(config.to_json()), 2, 2)),), revision=2)
    )
    builder.update(view, changes)
    assert builder.topology().interface.mtu == 1300
    # Set by the mesh, the MTU no longer follows the underlay (but auto would, from where the underlay is now).
    assert not builder.set_auto_mtu(8941) and builder.topology().interface.mtu == 1300
