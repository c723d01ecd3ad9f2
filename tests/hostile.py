"""A mesh of three honest nodes for tests to attack: what an attacker with write access to etcd could do to it,
and the checks that it came through whole (its nodes still peers, nothing dangerous in the desired device)."""

from __future__ import annotations

import ipaddress

from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.changes import ChangeLog, Changes, Rejection
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.topology import build_topology
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.networks import network_problem
from warren_mesh.trust.records import MeshConfig, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot, WatchResult

SCHEMA = KeySchema("/h")
LOCAL_KEY = NodeKey.generate().public_key
UNDERLAY = "192.168.240.0/24"
ETCD = "192.168.240.1/32"
LOCAL = LocalNode(
    "local",
    LOCAL_KEY,
    (ipaddress.ip_address("10.96.0.1"),),
    protected=(ipaddress.ip_network(UNDERLAY), ipaddress.ip_network(ETCD)),
)
HONEST = {f"h{i}": (NodeKey.generate().public_key, f"10.96.0.{10 + i}", f"192.168.240.{10 + i}") for i in range(3)}
HONEST_SUBNETS = {f"h{i}": f"10.244.{i}.0/24" for i in range(3)}  # each honest node's pod subnet
# A dual-stack mesh (Mesh(dual=True)): its networks, this node's IPv6 underlay and etcd, and each honest node's
# IPv6 address, pod subnet and endpoint beside its IPv4 ones.
DUAL_CONFIG = MeshConfig.from_json(
    {"schema": 1, "overlay_cidrs": ["10.96.0.0/16", "fd96::/64"], "pod_cidrs": ["10.244.0.0/16", "fd44::/56"]}
)
UNDERLAY6 = "fd00:240::/64"
ETCD6 = "fd00:240::1/128"
LOCAL_DUAL = LocalNode(
    "local",
    LOCAL_KEY,
    (ipaddress.ip_address("10.96.0.1"), ipaddress.ip_address("fd96::1")),
    protected=tuple(ipaddress.ip_network(n) for n in (UNDERLAY, ETCD, UNDERLAY6, ETCD6)),
)
HONEST6 = {  # canonical texts, as records and claims carry them
    f"h{i}": (f"fd96::{10 + i:x}", str(ipaddress.ip_network(f"fd44:0:0:{i}::/64")), f"[fd00:240::{10 + i:x}]:51820")
    for i in range(3)
}
ATTACKER_KEY = NodeKey.generate().public_key


def node_doc(name: str, key: str, address: str, endpoint: str, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema": 1,
        "name": name,
        "public_key": key,
        "endpoint": endpoint,
        "overlay_ip": address,
        "allowed_ips": [],
        "listen_port": 51820,
        "published_at": 1.0,
    }
    doc.update(changes)
    return doc


def peer_doc(name: str, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {"schema": 1, "name": name, "public_key": ATTACKER_KEY, "allowed_ips": ["10.50.0.0/24"]}
    doc.update(changes)
    return doc


class Mesh:
    """A view holding three honest nodes (each with its claims on its address and its pod subnet), fed hostile
    records one revision at a time."""

    def __init__(self, *, confirming: bool = False, dual: bool = False) -> None:
        """``confirming``: each honest node's record confirms where it hears the other honest nodes (what honest
        observers publish once someone contests an endpoint: mesh/endpoints.py); ``dual``: a dual-stack mesh,
        every honest node with an IPv6 address, pod subnet and endpoint too, this node with an IPv6 underlay."""
        self.dual = dual
        self.rejections: list[Rejection] = []
        self.view = MeshView(SCHEMA)
        self._changes = ChangeLog()  # what the view saw since take_changes()
        self.revision = 0
        self.created: dict[str, int] = {}
        self.current: dict[str, KeyValue] = {}  # every key as etcd would hold it now
        items = [self._kv(SCHEMA.config, encode_json(DUAL_CONFIG.to_json()))] if dual else []
        for name, (key, address, endpoint) in HONEST.items():
            subnet = HONEST_SUBNETS[name]
            items.append(self._kv(SCHEMA.claim(name, address), b""))
            items.append(self._kv(SCHEMA.claim(name, subnet, "pods"), b""))
            doc = node_doc(name, key, address, f"{endpoint}:51820", allowed_ips=[subnet])
            if dual:
                address6, subnet6, endpoint6 = HONEST6[name]
                items.append(self._kv(SCHEMA.claim(name, address6), b""))
                items.append(self._kv(SCHEMA.claim(name, subnet6, "pods"), b""))
                doc |= {
                    "overlay_ips": [address, address6],
                    "allowed_ips": [subnet, subnet6],
                    "endpoints": [f"{endpoint}:51820", endpoint6],
                }
            if confirming:
                doc["observed_endpoints"] = {n: f"{e}:51820" for n, (_, _, e) in HONEST.items() if n != name}
            items.append(self._kv(SCHEMA.node(name), encode_json(doc)))
        self._apply(Snapshot(tuple(items), self.revision))

    def _apply(self, result: WatchResult) -> None:
        if isinstance(result, Snapshot):
            self.current = {kv.key: kv for kv in result.items}
        for event in result.events if isinstance(result, Events) else ():
            if event.kind == "put":
                self.current[event.kv.key] = event.kv
            else:
                self.current.pop(event.kv.key, None)
        changes = self.view.apply(result)
        self.rejections.extend(changes.rejections)
        self._changes.add(changes)

    def take_changes(self) -> Changes:
        """What the view saw change since the last call (everything, on the first)."""
        return self._changes.take()

    def _kv(self, key: str, value: bytes) -> KeyValue:
        self.revision += 1
        create = self.created.setdefault(key, self.revision)
        return KeyValue(key, value, create, self.revision, lease=0)

    def put(self, key: str, value: bytes | dict[str, object]) -> None:
        raw = encode_json(value) if isinstance(value, dict) else value
        self._apply(Events((Event("put", self._kv(key, raw)),), self.revision))

    def delete(self, key: str) -> None:
        self.revision += 1
        self.created.pop(key, None)
        self._apply(Events((Event("delete", KeyValue(key, b"", 0, self.revision)),), self.revision))

    def topology(self) -> Topology:
        return build_topology(local=LOCAL_DUAL if self.dual else LOCAL, view=self.view, auto_mtu=1420)

    def reasons(self) -> set[str]:
        return {r.reason for r in self.rejections} | {c.reason for c in self.topology().conflicts}

    def assert_honest_intact(self) -> None:
        topology = self.topology()
        for name, (key, address, _) in HONEST.items():
            assert topology.names.get(key) == name, f"{name} lost its place: {topology.conflicts}"
            assert f"{address}/32" in topology.peers[key].allowed_ips
            if self.dual:
                address6, subnet6, _ = HONEST6[name]
                assert {f"{address6}/128", subnet6} <= set(topology.peers[key].allowed_ips), topology.conflicts
            # Every network its record names, its pod subnet included, and nobody else has any of them.
            claimed = set(self.view.nodes[name].record.routes.text)
            assert claimed <= set(topology.peers[key].allowed_ips), f"{name} lost a network: {topology.conflicts}"
            for other, spec in topology.peers.items():
                assert other == key or not claimed & set(spec.allowed_ips), f"{name}'s networks routed elsewhere"
        assert_safe(topology)


def assert_safe(topology: Topology) -> None:
    """Nothing in the desired device routes a special range, the underlay or etcd into the tunnel."""
    protected = [ipaddress.ip_network(n) for n in (UNDERLAY, ETCD, UNDERLAY6, ETCD6)]
    for spec in topology.peers.values():
        for text in spec.allowed_ips:
            network = ipaddress.ip_network(text)
            assert network_problem(network) is None, text
            assert not any(network.version == p.version and network.overlaps(p) for p in protected), text
