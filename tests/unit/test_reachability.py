"""Which peers a node says it cannot reach directly (agent/reachability.py): silence of a dialled peer for
NO_HANDSHAKE_AFTER, a handshake gone stale, no shared underlay family; never while the keepalive is off."""

from __future__ import annotations

import ipaddress

from warren_mesh.agent.identity import Identity
from warren_mesh.agent.publication import RecordPublisher
from warren_mesh.agent.reachability import NO_HANDSHAKE_AFTER, STALE_AFTER, Reachability
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.paths import Paths
from warren_mesh.mesh.view import MeshView
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.device import DeviceState, PeerSpec, PeerStats
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

SCHEMA = KeySchema("/r")
KEYS = {name: NodeKey.generate().public_key for name in ("b", "c", "d")}
NOW = 1_000_000.0


def _view() -> MeshView:
    items = []
    for i, name in enumerate(KEYS, start=2):
        record = NodeRecord(
            name=name,
            public_key=KEYS[name],
            endpoints=(Endpoint(ipaddress.ip_address(f"192.0.2.{i}"), 51820),),
            overlay_ips=(ipaddress.ip_address(f"10.96.0.{i}"),),
            listen_port=51820,
        )
        items.append(KeyValue(SCHEMA.node(name), encode_json(record.to_json()), i, i))
    view = MeshView(SCHEMA)
    view.apply(Snapshot(tuple(items), 9))
    return view


def _watch(paths: Paths | None = None) -> Reachability:
    publication = RecordPublisher(
        RegistrationSettings("a", ("192.0.2.1",), 51820, 10),
        store=MemoryStore(),
        schema=SCHEMA,
        identity=Identity(NodeKey.generate()),
        endpoint_hosts=(ipaddress.ip_address("192.0.2.1"),),
    )
    names = {key: name for name, key in KEYS.items()}
    return Reachability(publication, _view(), peer_names=lambda: names, paths=lambda: paths)


def _device(keepalive: int = 25, **handshakes: float) -> DeviceState:
    peers = {KEYS[n]: PeerSpec(KEYS[n], f"192.0.2.{i}:51820", (), keepalive) for i, n in enumerate(KEYS, start=2)}
    stats = {KEYS[n]: PeerStats(0, 0, handshakes.get(n, 0.0)) for n in KEYS}
    return DeviceState(None, None, peers, stats=stats)


def test_a_peer_silent_for_too_long_or_gone_stale_is_unreachable_one_that_answers_is_not() -> None:
    watch = _watch()
    device = _device(b=NOW)  # b handshaken just now; c and d never
    assert watch.unreachable(device, NOW) == (), "nobody is dialled long enough yet"
    assert watch.unreachable(device, NOW + NO_HANDSHAKE_AFTER - 1) == ()
    assert watch.unreachable(device, NOW + NO_HANDSHAKE_AFTER + 1) == ("c", "d")
    later = NOW + STALE_AFTER + 1
    assert watch.unreachable(_device(b=NOW, c=later - 1), later) == ("b", "d"), "b's session went stale"
    # Only the peers it should talk to directly count (its location's, with locations).
    located = _watch(Paths("a", "x", carriers={"c": "c", "b": "c", "d": "c"}, direct={"c": False}))
    located.unreachable(device, NOW)
    assert located.unreachable(device, NOW + NO_HANDSHAKE_AFTER + 1) == ("c",)


def test_silence_says_nothing_with_the_keepalive_off_and_no_shared_family_says_it_at_once() -> None:
    watch = _watch()
    quiet = _device(keepalive=0)
    watch.unreachable(quiet, NOW)
    assert watch.unreachable(quiet, NOW + STALE_AFTER * 10) == (), "an idle pair never handshakes without keepalive"
    device = _device(b=NOW, c=NOW, d=NOW)
    peers = dict(device.peers)
    peers[KEYS["d"]] = PeerSpec(KEYS["d"], None, (), 25)  # no underlay family in common: nothing to dial
    assert watch.unreachable(DeviceState(None, None, peers, stats=device.stats), NOW) == ("d",)
