"""`warren-mesh graph`: the DOT of a mesh, edges judged by what agents' metrics say, and Graphviz accepting it."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from warren_mesh.admin.graph import draw, render_dot
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.view import MeshView
from warren_mesh.metrics.reading import AgentReading, PeerReading, parse_agent_metrics
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import ExternalPeer, NodeRecord, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

SCHEMA = KeySchema("/g")
KEYS = {name: NodeKey.generate().public_key for name in ("a", "b", "c", "laptop")}
NOW = 1_000_000.0


def _view() -> MeshView:
    items = []
    for i, name in enumerate(("a", "b", "c"), start=1):
        node = NodeRecord(
            name=name,
            public_key=KEYS[name],
            endpoints=(Endpoint(ipaddress.ip_address(f"192.0.2.{i}"), 51820),),
            overlay_ips=(ipaddress.ip_address(f"10.96.0.{i}"),),
            listen_port=51820,
            allowed_ips=(ipaddress.ip_network(f"10.244.{i}.0/24"),),
            published_at=1.0,
        )
        items.append(KeyValue(SCHEMA.node(name), encode_json(node.to_json()), i, i, lease=7))
        items.append(KeyValue(SCHEMA.claim(name, f"10.96.0.{i}"), b"", i, i))
        items.append(KeyValue(SCHEMA.claim(name, f"10.244.{i}.0/24", "pods"), b"", i, i))
    laptop = ExternalPeer("laptop", KEYS["laptop"], (ipaddress.ip_network("10.96.255.254/32"),))
    items.append(KeyValue(SCHEMA.peer("laptop"), encode_json(laptop.to_json()), 9, 9))
    view = MeshView(SCHEMA)
    view.apply(Snapshot(tuple(items), 9))
    return view


def _edge(dot: str, a: str, b: str) -> str:
    return next(line for line in dot.splitlines() if f'"{a}" -- "{b}"' in line)


def test_edges_are_the_full_mesh_labelled_by_the_agents_and_red_when_stale() -> None:
    # a sees b fresh (handshake 10 s ago, traffic) and c not for 200 s; b sees a fresh; nobody reports on b--c.
    readings = [
        AgentReading(
            "a",
            {
                KEYS["b"]: PeerReading(NOW - 10, 125_000.0, 250_000.0),
                KEYS["c"]: PeerReading(NOW - 200, 0.0, 0.0),
            },
        ),
        AgentReading("b", {KEYS["a"]: PeerReading(NOW - 12), KEYS["laptop"]: PeerReading(0.0)}),
        AgentReading("elsewhere", {KEYS["a"]: PeerReading(NOW)}),  # an agent of no node here: ignored
    ]
    dot = render_dot(_view(), readings, now=NOW)
    assert dot.startswith("graph mesh {") and dot.rstrip().endswith("}")
    assert '"a" [shape=box, label="a\\n10.96.0.1\\n10.244.1.0/24"]' in dot
    assert '"laptop" [shape=ellipse' in dot
    fresh = _edge(dot, "a", "b")
    assert "darkgreen" in fresh and "a: handshake 10 s ago, in 1.0 Mbit/s, out 2.0 Mbit/s" in fresh
    assert "b: handshake 12 s ago" in fresh
    assert "red" in _edge(dot, "a", "c") and "handshake 3 min ago" in _edge(dot, "a", "c")
    assert "grey" in _edge(dot, "b", "c")
    assert "red" in _edge(dot, "laptop", "b") and "no handshake" in _edge(dot, "laptop", "b")
    assert "grey" in _edge(dot, "laptop", "a")
    assert sum(" -- " in line for line in dot.splitlines()) == 3 + 3  # the node pairs, the laptop to each node
    # What counts as stale is the caller's: the same readings, judged after 300 s, all fresh.
    assert "red" not in _edge(render_dot(_view(), readings, now=NOW, stale_after=300), "a", "c")


def test_graphviz_takes_the_dot() -> None:
    dot = render_dot(_view(), [AgentReading("a", {KEYS["b"]: PeerReading(NOW - 1)})], now=NOW)
    checked = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr
    svg = draw(dot, "svg")
    assert b"<svg" in svg and b"laptop" in svg
    assert draw(dot, "png").startswith(b"\x89PNG")
    assert draw(dot, "dot") == dot.encode()


def test_an_agents_metrics_are_read_back() -> None:
    text = (
        '# TYPE warren_mesh_agent_info gauge\nwarren_mesh_agent_info{node_name="a",backend="userspace"} 1.0\n'
        "# TYPE warren_mesh_peer_last_handshake_timestamp_seconds gauge\n"
        f'warren_mesh_peer_last_handshake_timestamp_seconds{{peer="b",public_key="{KEYS["b"]}"}} 123.0\n'
        "# TYPE warren_mesh_peer_receive_bytes_per_second gauge\n"
        f'warren_mesh_peer_receive_bytes_per_second{{peer="b",public_key="{KEYS["b"]}"}} 5.0\n'
    )
    reading = parse_agent_metrics(text)
    assert reading.node == "a"
    assert reading.peers == {KEYS["b"]: PeerReading(123.0, 5.0, None)}
    with pytest.raises(ValueError):
        parse_agent_metrics("this is { not metrics")


def _located_view() -> MeshView:
    """Location x: a (with an external endpoint, standing) and b; location y: c (the same); b and a say they cannot
    talk, and c relays them (y's gateway)."""
    places = {"a": ("x", True, ("b",)), "b": ("x", False, ("a",)), "c": ("y", True, ())}
    items = []
    for i, (name, (location, external, unreachable)) in enumerate(places.items(), start=1):
        node = NodeRecord(
            name=name,
            public_key=KEYS[name],
            endpoints=(Endpoint(ipaddress.ip_address(f"192.0.2.{i}"), 51820),),
            overlay_ips=(ipaddress.ip_address(f"10.96.0.{i}"),),
            listen_port=51820,
            published_at=1.0,
            location=location,
            external_endpoints=(Endpoint(ipaddress.ip_address(f"203.0.113.{i}"), 51820),) if external else (),
            unreachable=unreachable,
        )
        items.append(KeyValue(SCHEMA.node(name), encode_json(node.to_json()), i, i, lease=7))
        if external:
            items.append(KeyValue(SCHEMA.candidacy(name, location), b"", 10 + i, 10 + i, lease=7))
    view = MeshView(SCHEMA)
    view.apply(Snapshot(tuple(items), 20))
    return view


def test_locations_are_clusters_gateways_have_a_double_border_and_only_direct_pairs_are_edges() -> None:
    dot = render_dot(_located_view(), [], now=NOW)
    assert 'label="location x"' in dot and 'label="location y"' in dot
    assert "peripheries=2" in next(line for line in dot.splitlines() if line.strip().startswith('"a" ['))
    assert "peripheries=2" not in next(line for line in dot.splitlines() if line.strip().startswith('"b" ['))
    assert '"a" -- "c"' in dot and '"b" -- "c"' not in dot, "b reaches y through its gateway"
    assert "relayed through c" not in _edge(dot, "a", "c")
    # a and b both say they cannot talk, but the only gateway both reach directly is a itself: no relay.
    assert "relayed" not in _edge(dot, "a", "b")
    subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True)
