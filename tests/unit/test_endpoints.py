"""Endpoints seen rather than said (mesh/endpoints.py): what an agent publishes, and what a node behind NAT takes."""

from __future__ import annotations

import ipaddress

from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.endpoints import observed_elsewhere, public_endpoint
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.device import DeviceState, PeerSpec, PeerStats
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

SCHEMA = KeySchema("/e")
KEYS = {name: NodeKey.generate().public_key for name in ("a", "b", "c", "d")}
NOW = 1_000_000.0


def _view(observed: dict[str, dict[str, str]], endpoints: dict[str, str] | None = None) -> MeshView:
    items = []
    for i, name in enumerate(("a", "b", "c", "d"), start=1):
        record = NodeRecord(
            name=name,
            public_key=KEYS[name],
            endpoint=Endpoint.parse((endpoints or {}).get(name, f"10.231.{i}.2:51820")),
            overlay_ip=ipaddress.ip_address(f"10.96.0.{i}"),
            listen_port=51820,
            observed_endpoints=tuple((n, Endpoint.parse(e)) for n, e in sorted(observed.get(name, {}).items())),
        )
        items.append(KeyValue(SCHEMA.node(name), encode_json(record.to_json()), i, i, lease=7))
        items.append(KeyValue(SCHEMA.claim(name, f"10.96.0.{i}"), b"", i, i))
    view = MeshView(SCHEMA)
    view.apply(Snapshot(tuple(items), 9))
    return view


def test_only_live_sessions_seen_elsewhere_than_their_records_are_published() -> None:
    view = _view({})
    names = {KEYS[n]: n for n in KEYS}
    device = DeviceState(
        KEYS["a"],
        None,
        peers={
            KEYS["b"]: PeerSpec(KEYS["b"], "192.0.2.2:40000", ("10.96.0.2/32",)),  # roamed: b is behind NAT
            KEYS["c"]: PeerSpec(KEYS["c"], "10.231.3.2:51820", ("10.96.0.3/32",)),  # where its record says
            KEYS["d"]: PeerSpec(KEYS["d"], "192.0.2.4:51820", ("10.96.0.4/32",)),  # elsewhere, but long dead
        },
        stats={
            KEYS["b"]: PeerStats(1, 1, NOW - 30),
            KEYS["c"]: PeerStats(1, 1, NOW - 30),
            KEYS["d"]: PeerStats(1, 1, NOW - 600),
        },
    )
    assert observed_elsewhere(device, names, view, now=NOW) == (("b", Endpoint.parse("192.0.2.2:40000")),)


def test_a_node_takes_the_endpoint_most_observers_see_it_at() -> None:
    assert public_endpoint(_view({}), "b") is None
    # c and d see b at one endpoint; a (lying, or behind another path) at another: the majority wins.
    view = _view({"a": {"b": "198.51.100.9:1"}, "c": {"b": "192.0.2.2:40000"}, "d": {"b": "192.0.2.2:40000"}})
    assert public_endpoint(view, "b") == Endpoint.parse("192.0.2.2:40000")
    # What b says of itself does not count; a tie goes to the lowest endpoint.
    tie = _view({"a": {"b": "192.0.2.9:1"}, "b": {"b": "203.0.113.1:1"}, "c": {"b": "192.0.2.2:40000"}})
    assert public_endpoint(tie, "b") == Endpoint.parse("192.0.2.2:40000")
