"""Dual-stack as pure logic: the config and records of two families, what a record may claim in each, which
endpoint a peer dials, and the device a dual-stack node gets (addresses, routes). The same on real parts:
tests/dataplane/test_dual_stack.py."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from warren_mesh.host import forwarding
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.desired import Topology
from warren_mesh.mesh.plan import desired_routes
from warren_mesh.mesh.renumbering import renumbering_refusal
from warren_mesh.mesh.topology import build_topology
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import MeshConfig, NodeRecord, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

SCHEMA = KeySchema("/t")
DUAL_DOC = {"schema": 1, "overlay_cidrs": ["10.96.0.0/16", "fd96::/64"], "pod_cidrs": ["10.244.0.0/16", "fd44::/56"]}
DUAL = MeshConfig.from_json(DUAL_DOC)
KEYS = {name: NodeKey.generate().public_key for name in ("local", "a", "b", "c")}
LOCAL = LocalNode(
    "local",
    KEYS["local"],
    (ipaddress.ip_address("10.96.0.1"), ipaddress.ip_address("fd96::1")),
    allowed_ips=(ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd44:0:0:1::/64")),
    underlay_families=(4, 6),
)


def node(name: str, index: int, **fields: Any) -> dict[str, Any]:
    """A dual-stack node record as JSON: IPv4 and IPv6 endpoints, addresses and pod subnets."""
    doc: dict[str, Any] = {
        "schema": 1,
        "name": name,
        "public_key": KEYS[name],
        "endpoint": f"192.0.2.{index}:51820",
        "endpoints": [f"192.0.2.{index}:51820", f"[2001:db8::{index}]:51820"],
        "overlay_ip": f"10.96.0.{index}",
        "overlay_ips": [f"10.96.0.{index}", f"fd96::{index}"],
        "allowed_ips": [f"10.244.{index}.0/24", f"fd44:0:0:{index}::/64"],
        "listen_port": 51820,
        "published_at": 1.0,
    }
    return doc | fields


def view_of(*docs: dict[str, Any], config: MeshConfig = DUAL) -> MeshView:
    """A view of ``docs`` and their claims (each node holding what its record says), under ``config``."""
    items = [KeyValue(SCHEMA.config, encode_json(config.to_json()), 1, 1)]
    revision = 2
    for doc in docs:
        name = doc["name"]
        for address in doc.get("overlay_ips", [doc["overlay_ip"]]):
            items.append(KeyValue(SCHEMA.claim(name, address), b"", revision, revision))
            revision += 1
        for subnet in doc.get("allowed_ips", []):
            items.append(KeyValue(SCHEMA.claim(name, subnet, "pods"), b"", revision, revision))
            revision += 1
        items.append(KeyValue(SCHEMA.node(name), json.dumps(doc).encode(), revision, revision, lease=7))
        revision += 1
    view = MeshView(SCHEMA)
    view.apply(Snapshot(tuple(items), revision))
    return view


def topology(view: MeshView, local: LocalNode = LOCAL) -> Topology:
    return build_topology(local=local, view=view, auto_mtu=1420)


def test_a_dual_stack_config_round_trips_and_keeps_the_single_names_for_older_readers() -> None:
    doc = DUAL.to_json()
    assert doc["overlay_cidr"] == "10.96.0.0/16" and doc["pod_cidr"] == "10.244.0.0/16"
    assert doc["node_subnet_prefix_ipv6"] == 64 and doc["node_subnet_prefix"] == 24
    assert MeshConfig.from_json(decode_json(encode_json(doc))) == DUAL
    assert DUAL.families == (4, 6) and [p.node_prefix for p in DUAL.pod_networks] == [24, 64]
    assert "overlay_cidrs" not in MeshConfig().to_json()  # a single-family config reads as before


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"overlay_cidrs": ["10.96.0.0/16", "10.97.0.0/16"]}, "one IPv4 and one IPv6"),
        ({"overlay_cidrs": ["10.96.0.0/16", "fd96::/64", "fd97::/64"]}, "one IPv4 and one IPv6"),
        ({"overlay_cidr": "10.95.0.0/16"}, "is not the first of overlay_cidrs"),
        ({"pod_cidrs": ["10.244.0.0/16", "fd96::/60"]}, "pod_cidrs fd96::/60 overlaps overlay_cidrs fd96::/64"),
        ({"pod_cidrs": ["10.244.0.0/16", "::/0"]}, "default route"),
        ({"overlay_cidrs": ["10.96.0.0/16", "fe80::/64"]}, "special-purpose range"),
        ({"overlay_cidrs": ["10.96.0.0/16", "::ffff:0:0/104"]}, "special-purpose range"),
        ({"node_subnet_prefix_ipv6": 127}, "leaves no room for pods"),
    ],
)
def test_a_bad_dual_stack_config_is_refused_in_one_line(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RecordError, match=complaint):
        MeshConfig.from_json(DUAL_DOC | fields)


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"endpoints": ["192.0.2.3:51820", "192.0.2.4:51820"]}, "one IPv4 and one IPv6"),
        ({"endpoints": ["[2001:db8::3]:51820", "192.0.2.3:51820"]}, "is not the first of endpoints"),
        ({"endpoints": ["192.0.2.3:51820", "[fe80::3]:51820"]}, "special-purpose range"),
        ({"endpoints": ["192.0.2.3:51820", "[::ffff:192.0.2.3]:51820"]}, "IPv4-mapped"),
        ({"endpoints": ["192.0.2.3:51820", "[ff02::1]:51820"]}, "special-purpose range"),
        ({"overlay_ips": ["10.96.0.3", "fd96::3", "fd96::4"]}, "one IPv4 and one IPv6"),
        ({"overlay_ips": ["10.96.0.3", "::1"]}, "not an address a mesh can use"),
        ({"overlay_ips": ["10.96.0.3", "fe80::3%eth0"]}, "not an address a mesh can use"),
        ({"allowed_ips": ["fd96::/120"]}, "covers the overlay address fd96::3"),
    ],
)
def test_a_bad_dual_stack_record_is_refused_in_one_line(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RecordError, match=complaint):
        NodeRecord.from_json(node("a", 3) | fields, key_name="a")


def test_peers_route_both_families_and_dial_ipv4_when_both_have_it() -> None:
    topo = topology(view_of(node("a", 3)))
    (peer,) = topo.peers.values()
    assert set(peer.allowed_ips) == {"10.96.0.3/32", "fd96::3/128", "10.244.3.0/24", "fd44:0:0:3::/64"}
    assert peer.endpoint == "192.0.2.3:51820" and not topo.conflicts and topo.unreachable == ()
    assert topo.interface.addresses == ("10.96.0.1/16", "fd96::1/64")
    # Both pod networks are one route each; the overlay networks are the interface's own prefixes.
    assert desired_routes(topo) == {"10.244.0.0/16", "fd44::/56"}


def test_the_endpoint_dialled_is_of_a_family_both_have_and_none_when_they_share_none() -> None:
    ipv6_only = node("a", 3, endpoint="[2001:db8::3]:51820", endpoints=["[2001:db8::3]:51820"])
    ipv4_only = node("b", 4, endpoint="192.0.2.4:51820", endpoints=["192.0.2.4:51820"])
    view = view_of(ipv6_only, ipv4_only)
    topo = topology(view)  # local has both
    assert {topo.names[k]: p.endpoint for k, p in topo.peers.items()} == {
        "a": "[2001:db8::3]:51820",
        "b": "192.0.2.4:51820",
    }
    local_v4 = LocalNode(LOCAL.name, LOCAL.public_key, LOCAL.overlay_ips, LOCAL.allowed_ips, (), (4,))
    topo = topology(view, local_v4)
    endpoints = {topo.names[k]: p.endpoint for k, p in topo.peers.items()}
    # Configured all the same (its traffic stays in the tunnel), never dialled, and said.
    assert endpoints == {"a": None, "b": "192.0.2.4:51820"} and topo.unreachable == ("a",)
    assert not topo.conflicts


def test_each_family_is_held_to_its_own_networks_and_claims() -> None:
    cases = {
        "address_outside_cidr": node("a", 3, overlay_ips=["10.96.0.3", "fd97::3"]),
        "network_not_owned": node("a", 3, allowed_ips=["10.244.3.0/24", "fd44:0:0:3::/64", "fd44:0:0:4::/64"]),
        "unsafe_route": node("a", 3, endpoints=["192.0.2.3:51820", "[fd96::99]:51820"]),
    }
    for reason, doc in cases.items():
        topo = topology(view_of(doc))
        assert [c.reason for c in topo.conflicts] == [reason], (reason, topo.conflicts)
    # A pod subnet of the right family and length that nobody claimed is refused like an IPv4 one.
    doc = node("a", 3)
    view = view_of(doc | {"allowed_ips": ["10.244.3.0/24"]})
    unclaimed = doc | {"allowed_ips": ["10.244.3.0/24", "fd44:0:0:3::/64"]}
    view.apply(Snapshot((*_items(view), KeyValue(SCHEMA.node("a"), json.dumps(unclaimed).encode(), 50, 50, 7)), 50))
    assert [c.reason for c in topology(view).conflicts] == ["network_not_owned"]
    # An IPv6 claim held by another node is taken by nobody else.
    b = node("b", 4, overlay_ips=["10.96.0.4", "fd96::3"])
    assert [c.reason for c in topology(view_of(node("a", 3), b)).conflicts] == ["address_taken"]


def _items(view: MeshView) -> list[KeyValue]:
    """Claims and the config of ``view`` as the key-values they came from (nodes left out)."""
    items = [KeyValue(SCHEMA.config, encode_json(view.config.to_json()), 1, 1)]
    for holder in view.reservations.values():
        items.append(KeyValue(holder.key, b"", holder.create_revision, holder.create_revision))
    return items


def test_a_record_of_one_family_stays_in_a_mesh_that_gained_the_other() -> None:
    """Nodes registered before the edit that made the mesh dual-stack keep their place until they claim."""
    ipv4 = node("a", 3, endpoints=["192.0.2.3:51820"], overlay_ips=["10.96.0.3"], allowed_ips=["10.244.3.0/24"])
    topo = topology(view_of(ipv4))
    (peer,) = topo.peers.values()
    assert set(peer.allowed_ips) == {"10.96.0.3/32", "10.244.3.0/24"} and not topo.conflicts


def test_a_family_in_use_is_not_removed_and_one_more_is_added() -> None:
    view = view_of(node("a", 3))
    single = MeshConfig()
    assert renumbering_refusal(single, view.nodes, DUAL) is not None  # a's IPv6 address would be left out
    ipv4_nodes = view_of(node("a", 3, overlay_ips=["10.96.0.3"], allowed_ips=["10.244.3.0/24"]), config=single)
    assert renumbering_refusal(DUAL, ipv4_nodes.nodes, single) is None


def test_masquerade_is_on_for_both_families_and_each_can_be_turned_off() -> None:
    routing = forwarding.PodRouting(
        (ipaddress.ip_network("10.244.3.0/24"), ipaddress.ip_network("fd44:0:0:3::/64")),
        DUAL.pod_cidrs,
        DUAL.overlay_cidrs,
        "wg0",
        DUAL.masquerade,
    )
    assert DUAL.masquerade == (4, 6) and routing.rules == 3
    assert "ip6 saddr fd44:0:0:3::/64 ip6 daddr != { fd44::/56, fd96::/64 } masquerade" in routing.ruleset()
    routed = MeshConfig.from_json(DUAL_DOC | {"masquerade_ipv6": False})  # pod prefixes routed outside
    assert routed.masquerade == (4,) and routed.to_json()["masquerade_ipv6"] is False
    assert MeshConfig.from_json(decode_json(encode_json(routed.to_json()))) == routed
    only_ipv4 = forwarding.PodRouting(routing.subnets, DUAL.pod_cidrs, DUAL.overlay_cidrs, "wg0", routed.masquerade)
    assert only_ipv4.rules == 2 and "ip6 saddr" not in only_ipv4.ruleset() and "ip saddr" in only_ipv4.ruleset()
    assert only_ipv4.digest() != routing.digest()  # a resync sees the change and replaces the table
    with pytest.raises(RecordError, match=r"masquerade_ipv6 .1. is not true or false"):
        MeshConfig.from_json(DUAL_DOC | {"masquerade_ipv6": 1})
