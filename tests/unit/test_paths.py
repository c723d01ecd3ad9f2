"""Locations, gateways and relays (mesh/paths.py): who carries whose traffic, on hand-made meshes and random ones."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warren_mesh.admin import showconf
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.candidacies import Candidacy
from warren_mesh.mesh.paths import Routing, dialled_endpoint, elect_gateways, routed_peers
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.device import PeerSpec
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

KEYS = [NodeKey.generate().public_key for _ in range(12)]


def _node(
    index: int,
    location: str | None,
    *,
    external: bool = False,
    unreachable: tuple[str, ...] = (),
) -> NodeRecord:
    return NodeRecord(
        name=f"n{index}",
        public_key=KEYS[index],
        endpoints=(Endpoint(ipaddress.ip_address(f"192.168.1.{index + 1}"), 51820),),
        overlay_ips=(ipaddress.ip_address(f"10.96.0.{index + 1}"),),
        listen_port=51820,
        allowed_ips=(ipaddress.ip_network(f"10.244.{index}.0/24"),),
        location=location,
        external_endpoints=(Endpoint(ipaddress.ip_address(f"203.0.113.{index + 1}"), 51820),) if external else (),
        unreachable=unreachable,
    )


def _mesh(*records: NodeRecord) -> dict[str, NodeRecord]:
    return {r.name: r for r in records}


def _stand(nodes: dict[str, NodeRecord], *names: str) -> dict[str, Candidacy]:
    """Candidacies of ``names`` for their records' locations, the first the oldest."""
    return {
        name: Candidacy(10 + i, f"/t/v1/claims/{name}/gateway/{nodes[name].location}", name, str(nodes[name].location))
        for i, name in enumerate(names)
    }


def _two_locations(**unreachable: tuple[str, ...]) -> dict[str, NodeRecord]:
    """a: n0 (external), n1 (external), n2; b: n3 (external), n4."""
    layout = [("a", True), ("a", True), ("a", False), ("b", True), ("b", False)]
    return _mesh(
        *(_node(i, loc, external=ext, unreachable=unreachable.get(f"n{i}", ())) for i, (loc, ext) in enumerate(layout))
    )


def test_a_mesh_without_locations_is_a_full_mesh() -> None:
    nodes = _mesh(*(_node(i, None) for i in range(4)))
    routing = Routing(nodes, {})
    assert routing.gateways == {f"node:n{i}": f"n{i}" for i in range(4)}, "each its own location and gateway"
    paths = routing.paths("n0")
    assert paths.carriers == {"n1": "n1", "n2": "n2", "n3": "n3"} and not paths.unrouted and not paths.relayed


def test_a_location_reaches_the_others_through_its_gateway_and_gateways_talk_over_external_endpoints() -> None:
    nodes = _two_locations()
    routing = Routing(nodes, _stand(nodes, "n0", "n1", "n3"))
    assert routing.gateways == {"a": "n0", "b": "n3"}, "the oldest candidate of each location"
    inside = routing.paths("n2")
    assert inside.carriers == {"n0": "n0", "n1": "n1", "n3": "n0", "n4": "n0"}
    assert inside.direct == {"n0": False, "n1": False}, "its own location only, over internal endpoints"
    gateway = routing.paths("n0")
    assert gateway.carriers == {"n1": "n1", "n2": "n2", "n3": "n3", "n4": "n3"}
    assert gateway.direct == {"n1": False, "n2": False, "n3": True}, "the other gateway over its external endpoint"
    # On the device: the gateway's peer carries the other location's routes; nodes there are no peers.
    specs = {n: (PeerSpec(r.public_key, None, r.routes.text, 25), None) for n, r in nodes.items()}
    peers = routed_peers(inside, nodes, specs, (4,))
    assert set(peers) == {KEYS[0], KEYS[1]}
    assert peers[KEYS[0]].allowed_ips == tuple(
        sorted([*nodes["n0"].routes.text, *nodes["n3"].routes.text, *nodes["n4"].routes.text])
    )
    assert peers[KEYS[0]].endpoint == "192.168.1.1:51820"
    assert routed_peers(gateway, nodes, specs, (4,))[KEYS[3]].endpoint == "203.0.113.4:51820"


def test_who_may_be_a_gateway() -> None:
    nodes = _two_locations()
    # A candidate without an external endpoint, or standing for another location than its record says, is none.
    stray = Candidacy(1, "/t/v1/claims/n4/gateway/b", "n4", "b")
    liar = Candidacy(2, "/t/v1/claims/n2/gateway/b", "n2", "b")
    assert elect_gateways(nodes, {"n4": stray, "n2": liar, **_stand(nodes, "n3")}) == {"b": "n3"}
    # The Mesh's list: only those.
    assert elect_gateways(nodes, _stand(nodes, "n0", "n1", "n3"), allowed=frozenset({"n1"})) == {"a": "n1"}
    # A location without a gateway: its nodes and the others' have no path between them, and say so.
    routing = Routing(nodes, _stand(nodes, "n0"))
    assert routing.paths("n2").unrouted == ("n3", "n4")
    assert routing.paths("n0").unrouted == ("n3", "n4")
    assert routing.paths("n4").unrouted == ("n0", "n1", "n2")


def test_a_node_without_a_location_is_its_own_gateway_among_located_ones() -> None:
    nodes = {**_two_locations(), "n5": _node(5, None)}
    routing = Routing(nodes, _stand(nodes, "n0", "n3"))
    assert routing.paths("n5").carriers == {"n0": "n0", "n1": "n0", "n2": "n0", "n3": "n3", "n4": "n3"}
    assert routing.paths("n2").carriers["n5"] == "n0"
    assert routing.paths("n0").direct["n5"] is True


def test_a_pair_that_both_say_cannot_talk_goes_through_a_relay_and_keeps_its_direct_peer() -> None:
    nodes = _two_locations(n1=("n2",), n2=("n1",))
    routing = Routing(nodes, _stand(nodes, "n0", "n3"))
    assert routing.relays == {("n1", "n2"): "n0"}, "by default, a gateway both reach"
    paths = routing.paths("n1")
    assert paths.relayed == {"n2": "n0"} and paths.carriers["n2"] == "n0" and "n2" in paths.direct
    specs = {n: (PeerSpec(r.public_key, None, r.routes.text, 25), None) for n, r in nodes.items()}
    peers = routed_peers(paths, nodes, specs, (4,))
    assert peers[KEYS[2]].allowed_ips == () and peers[KEYS[2]].endpoint == "192.168.1.3:51820", "still tried"
    assert set(nodes["n2"].routes.text) <= set(peers[KEYS[0]].allowed_ips)
    # One side alone saying so: direct. No relay allowed by the Mesh: direct (and failing) too.
    assert not Routing(_two_locations(n1=("n2",)), _stand(nodes, "n0", "n3")).relays
    assert not Routing(nodes, _stand(nodes, "n0", "n3"), relays=frozenset()).relays
    # A relay that either side cannot reach, or that cannot reach either, is none.
    assert not Routing(_two_locations(n1=("n2", "n0"), n2=("n1",)), _stand(nodes, "n0", "n3")).relays
    assert not Routing(_two_locations(n1=("n2",), n2=("n1",), n0=("n2",)), _stand(nodes, "n0", "n3")).relays


def test_two_gateways_that_cannot_talk_go_through_a_third_locations_gateway() -> None:
    nodes = {**_two_locations(n0=("n3",), n3=("n0",)), "n5": _node(5, "c", external=True)}
    routing = Routing(nodes, _stand(nodes, "n0", "n3", "n5"))
    assert routing.relays == {("n0", "n3"): "n5"}
    assert routing.paths("n0").carriers["n4"] == "n5", "b's traffic follows b's gateway through the relay"
    _assert_every_pair_has_one_path(routing)


def test_the_dialled_endpoint_of_another_location_is_the_external_one_when_there_is_one() -> None:
    record = _node(1, "a", external=True)
    assert dialled_endpoint(record, (4,)) == "192.168.1.2:51820"
    assert dialled_endpoint(record, (4,), external=True) == "203.0.113.2:51820"
    assert dialled_endpoint(_node(2, "a"), (4,), external=True) == "192.168.1.3:51820", "none: its endpoint"
    assert dialled_endpoint(record, (6,), external=True) is None, "no family in common"


def _assert_every_pair_has_one_path(routing: Routing) -> None:
    """From every node to every other it has a route to: hop by hop along the carriers, every hop a direct pair
    whose receiving end takes the source's traffic from that hop (WireGuard's check of allowed IPs), in at most
    five hops, ending at the destination. And on every device, each node's routes go to one peer at most."""
    paths = {name: routing.paths(name) for name in routing.nodes}
    for source, own in paths.items():
        carried = [name for name in routing.nodes if name != source and name in own.carriers]
        assert len(carried) == len(set(carried))
        for target in routing.nodes:
            if target == source or target in own.unrouted:
                continue
            at, hops = source, 0
            while at != target:
                hop = paths[at].carriers[target]
                assert hop in paths[at].direct, f"{source}->{target}: {at} sends to {hop}, not a direct peer"
                assert paths[hop].carriers.get(source) == at, f"{source}->{target}: {hop} does not take it from {at}"
                at, hops = hop, hops + 1
                assert hops <= 5, f"{source}->{target}: a loop"


@st.composite
def _meshes(draw: st.DrawFn) -> tuple[dict[str, NodeRecord], dict[str, Candidacy]]:
    count = draw(st.integers(2, 10))
    names = [f"n{i}" for i in range(count)]
    records = []
    for i in range(count):
        location = draw(st.sampled_from([None, "a", "b", "c"]))
        unreachable = tuple(draw(st.sets(st.sampled_from(names), max_size=3)) - {f"n{i}"})
        records.append(_node(i, location, external=draw(st.booleans()), unreachable=unreachable))
    nodes = _mesh(*records)
    standing = [n for n in names if draw(st.booleans()) and nodes[n].location is not None]
    # Every located location has a candidate that can be its gateway, so that every pair has a path.
    for location in {r.location for r in records} - {None}:
        members = [r for r in records if r.location == location]
        if not any(r.external_endpoints and r.name in standing for r in members):
            first = members[0]
            nodes[first.name] = _node(int(first.name[1:]), location, external=True, unreachable=first.unreachable)
            standing.append(first.name)
    return nodes, _stand(nodes, *standing)


@settings(max_examples=300, deadline=None)
@given(_meshes())
def test_every_pair_of_nodes_has_exactly_one_path_and_no_device_routes_a_node_twice(
    mesh: tuple[dict[str, NodeRecord], dict[str, Candidacy]],
) -> None:
    nodes, candidacies = mesh
    routing = Routing(nodes, candidacies)
    assert not any(routing.paths(name).unrouted for name in nodes), "every location has a gateway"
    _assert_every_pair_has_one_path(routing)
    specs = {n: (PeerSpec(r.public_key, None, r.routes.text, 25), None) for n, r in nodes.items()}
    for name in nodes:
        peers = routed_peers(routing.paths(name), nodes, specs, (4,))
        routes = [text for peer in peers.values() for text in peer.allowed_ips]
        assert len(routes) == len(set(routes)), f"{name}: a network on two peers"
        assert set(routes) == {t for other, r in nodes.items() if other != name for t in r.routes.text}


def test_a_records_location_external_endpoints_and_unreachable_peers_round_trip_and_bad_ones_are_refused() -> None:
    record = _node(1, "eu-west-1a", external=True, unreachable=("n2", "n3"))
    assert NodeRecord.from_json(record.to_json(), key_name="n1") == record
    assert "location" not in _node(1, None).to_json(), "a record without them reads as before"
    doc = record.to_json()
    for field, value, message in (
        ("location", "eu west", "is not a label value"),
        ("location", "x" * 64, "is not a label value"),
        ("external_endpoints", ["203.0.113.1:1", "203.0.113.2:1"], "one IPv4 and one IPv6"),
        ("external_endpoints", ["127.0.0.1:51820"], "127.0.0.1"),
        ("unreachable", ["N3"], "N3"),
        ("unreachable", [f"n{i}" for i in range(257)], "at most 256"),
    ):
        with pytest.raises(RecordError, match=message):
            NodeRecord.from_json(doc | {field: value}, key_name="n1")


def test_showconf_gives_a_located_nodes_device_as_its_agent_computes_it() -> None:
    """x: n0 (external, standing: the gateway) and n1; y: n3 (the same). showconf node n1: its location's gateway
    is its only peer, carrying y's routes; n0's device dials n3 at its external endpoint and carries n1's."""
    schema = KeySchema("/s")
    nodes = _mesh(_node(0, "x", external=True), _node(1, "x"), _node(3, "y", external=True))
    items = []
    for revision, (name, record) in enumerate(nodes.items(), start=1):
        items.append(KeyValue(schema.node(name), encode_json(record.to_json()), revision, revision))
        items.append(KeyValue(schema.claim(name, record.overlay_texts[0]), b"", revision, revision))
        items.append(KeyValue(schema.claim(name, str(record.allowed_ips[0]), "pods"), b"", revision, revision))
        if record.external_endpoints:
            items.append(KeyValue(schema.candidacy(name, str(record.location)), b"", 10 + revision, 10 + revision))
    view = MeshView(schema)
    view.apply(Snapshot(tuple(items), 20))
    member = showconf.for_node(view, "n1")
    assert [member.names[p.public_key] for p in member.peers] == ["n0"]
    assert set(member.peers[0].allowed_ips) == {*nodes["n0"].routes.text, *nodes["n3"].routes.text}
    of_gateway = showconf.for_node(view, "n0")
    gateway = {of_gateway.names[p.public_key]: p for p in of_gateway.peers}
    assert gateway["n3"].endpoint == "203.0.113.4:51820" and set(gateway["n3"].allowed_ips) == set(
        nodes["n3"].routes.text
    )
    assert "[Peer]" in member.render() and "203.0.113.4" not in member.render()
