"""Endpoints seen rather than said (mesh/endpoints.py, the agent's EndpointWatch): what an agent publishes, and
what a node behind NAT takes: the honest count too, and one liar never moves a node."""

from __future__ import annotations

import ipaddress

from helpers import run
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.loops import EndpointWatch
from warren_mesh.agent.publication import RecordPublisher, Registration
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh import endpoints
from warren_mesh.mesh.endpoints import contested, observations, public_endpoint
from warren_mesh.mesh.view import MeshView
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import MeshConfig, NodeRecord, encode_json
from warren_mesh.values.device import DeviceState, PeerSpec, PeerStats
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

SCHEMA = KeySchema("/e")
NAMES = ("a", "b", "c", "d", "e")
KEYS = {name: NodeKey.generate().public_key for name in NAMES}
NOW = 1_000_000.0


def _home(name: str) -> str:
    return f"10.231.{NAMES.index(name) + 1}.2:51820"


def _view(observed: dict[str, dict[str, str]], endpoints_: dict[str, str] | None = None) -> MeshView:
    """Nodes a-e, each at its own endpoint unless ``endpoints_`` says otherwise, each observing what ``observed``
    says."""
    items = []
    for i, name in enumerate(NAMES, start=1):
        record = NodeRecord(
            name=name,
            public_key=KEYS[name],
            endpoints=(Endpoint.parse((endpoints_ or {}).get(name, _home(name))),),
            overlay_ips=(ipaddress.ip_address(f"10.96.0.{i}"),),
            listen_port=51820,
            observed_endpoints=tuple((n, Endpoint.parse(e)) for n, e in sorted(observed.get(name, {}).items())),
        )
        items.append(KeyValue(SCHEMA.node(name), encode_json(record.to_json()), i, i, lease=7))
        items.append(KeyValue(SCHEMA.claim(name, f"10.96.0.{i}"), b"", i, i))
    view = MeshView(SCHEMA)
    view.apply(Snapshot(tuple(items), 9))
    return view


def _device(peers: dict[str, str]) -> DeviceState:
    """A's device, with a peer for each node at the endpoint given."""
    return DeviceState(
        KEYS["a"],
        None,
        peers={KEYS[n]: PeerSpec(KEYS[n], ep, (f"10.96.0.{NAMES.index(n) + 1}/32",)) for n, ep in peers.items()},
        stats={KEYS[n]: PeerStats(1, 1, NOW - 30) for n in peers},
    )


NAMES_BY_KEY = {KEYS[n]: n for n in NAMES}


def _publication(store: MemoryStore) -> RecordPublisher:
    """Node b's record, as its agent publishes it."""
    return RecordPublisher(
        RegistrationSettings("b", (), None, 10, None),
        store=store,
        schema=SCHEMA,
        identity=Identity(NodeKey.generate()),
        endpoint_hosts=(ipaddress.ip_address("10.231.2.2"),),
    )


async def _registered() -> RecordPublisher:
    """Node b's publisher, its record published."""
    store = MemoryStore()
    publication = _publication(store)
    lease = await store.grant_lease(10)
    record = publication.record(MeshConfig(), (ipaddress.ip_address("10.96.0.2"),), ())
    publication.registered(Registration(await publication.publish(record, lease), lease, 10))
    return publication


def _no_poke(address: object) -> None:
    return None


def test_nodes_heard_from_elsewhere_are_published_and_the_contested_are_confirmed_where_they_are() -> None:
    device = _device({"b": "192.0.2.2:40000", "c": _home("c"), "d": "192.0.2.4:51820", "e": _home("e")})
    heard = {KEYS["b"]: NOW - 5, KEYS["c"]: NOW - 5, KEYS["d"]: NOW - 600, KEYS["e"]: NOW - 5}
    # Nobody disputes c or e: seen where their records say, nothing to publish. d was heard from too long ago.
    quiet = _view({})
    assert contested(quiet) == set()
    assert observations(device, NAMES_BY_KEY, quiet, heard=heard, contested_since={}, now=NOW) == (
        ("b", Endpoint.parse("192.0.2.2:40000")),
    )
    # Someone says e is elsewhere: a, which has heard e where its record says since it saw that, says so too.
    disputed = _view({"d": {"e": "203.0.113.66:4444"}})
    assert contested(disputed) == {"e"}
    since = {"e": NOW - 10}
    assert observations(device, NAMES_BY_KEY, disputed, heard=heard, contested_since=since, now=NOW) == (
        ("b", Endpoint.parse("192.0.2.2:40000")),
        ("e", Endpoint.parse(_home("e"))),
    )
    # Heard only before the contest began (a NAT rebinding since: it may hear nothing any more): no confirmation.
    late = {"e": NOW - 1}
    assert observations(device, NAMES_BY_KEY, disputed, heard=heard, contested_since=late, now=NOW) == (
        ("b", Endpoint.parse("192.0.2.2:40000")),
    )
    # What a node says of itself contests nothing; a peer never heard from is not vouched for.
    assert contested(_view({"e": {"e": "203.0.113.66:4444"}})) == set()
    assert observations(device, NAMES_BY_KEY, disputed, heard={}, contested_since=since, now=NOW) == ()


def test_a_node_behind_nat_takes_where_its_observers_see_it() -> None:
    assert public_endpoint(_view({}), "b") is None
    # The one observer that hears b (from behind b's NAT) decides: 1 against no one.
    assert public_endpoint(_view({"a": {"b": "192.0.2.2:40000"}}), "b") == Endpoint.parse("192.0.2.2:40000")
    # Three see it behind its NAT, one (beside it, on its private network) where its record says: three win.
    view = _view(
        {
            "a": {"b": "192.0.2.2:40000"},
            "c": {"b": "192.0.2.2:40000"},
            "d": {"b": "192.0.2.2:40000"},
            "e": {"b": _home("b")},
        }
    )
    assert public_endpoint(view, "b") == Endpoint.parse("192.0.2.2:40000")


def test_one_liar_never_moves_a_node_the_honest_see_where_it_says() -> None:
    lie = "203.0.113.66:4444"
    # e lies about b; a, c and d hear b where its record says and confirm it.
    honest = {n: {"b": _home("b")} for n in ("a", "c", "d")}
    assert public_endpoint(_view({**honest, "e": {"b": lie}}), "b") is None
    # Even one honest confirmation holds against one liar (a tie keeps the record's endpoint).
    assert public_endpoint(_view({"a": {"b": _home("b")}, "e": {"b": lie}}), "b") is None
    # What b says of itself does not count; between other endpoints a tie goes to the lowest.
    tie = _view({"a": {"b": "192.0.2.9:1"}, "b": {"b": "203.0.113.1:1"}, "c": {"b": "192.0.2.2:40000"}})
    assert public_endpoint(tie, "b") == Endpoint.parse("192.0.2.2:40000")


def test_a_node_takes_a_winning_endpoint_only_once_it_has_won_for_a_while() -> None:
    async def body() -> None:
        publication = await _registered()
        seen_at = {"a": {"b": "192.0.2.2:40000"}, "c": {"b": "192.0.2.2:40000"}}
        watch = EndpointWatch(publication, dict, _view(seen_at), poke=_no_poke, pinned=False)
        device = DeviceState(KEYS["b"], None, {})
        hold = endpoints.ADOPT_AFTER
        assert hold > 10 + 2 * 2 + endpoints.POKE_EVERY, "a poke's answer (10 s), two loops and a lost poke"
        await watch.publish(device, now=NOW)
        assert publication.public_endpoint is None, "a winner is not taken the moment it wins"
        await watch.publish(device, now=NOW + hold / 2)
        assert publication.public_endpoint is None
        await watch.publish(device, now=NOW + hold)
        assert publication.public_endpoint == Endpoint.parse("192.0.2.2:40000")
        # Pinned (--endpoint): never.
        pinned = EndpointWatch(publication, dict, _view(seen_at), poke=_no_poke, pinned=True)
        assert pinned._adoptable(NOW) is None and pinned._adoptable(NOW + 60) is None

    run(body())


def test_a_peer_is_heard_when_its_received_bytes_grow_or_at_its_handshake() -> None:
    watch = EndpointWatch(_publication(MemoryStore()), dict, _view({}), poke=_no_poke, pinned=False)
    first = DeviceState(None, None, {}, stats={KEYS["b"]: PeerStats(100, 0, 0.0)})
    assert watch._heard(first, NOW) == {}, "nothing to compare with yet, and no handshake"
    assert watch._heard(first, NOW + 2) == {}, "nothing received since"
    grown = DeviceState(None, None, {}, stats={KEYS["b"]: PeerStats(148, 0, 0.0)})
    assert watch._heard(grown, NOW + 4) == {KEYS["b"]: NOW + 4}
    assert watch._heard(grown, NOW + 6) == {KEYS["b"]: NOW + 4}
    assert watch._heard(DeviceState(None, None, {}), NOW + 8) == {}, "a peer gone is forgotten"


def test_a_peer_whose_keepalives_never_come_is_heard_at_its_handshakes() -> None:
    """The flake of the NAT lab test: node-1's keepalives to node-3 kept resetting node-3's, so node-1 heard node-3
    only at its handshake, which came before node-1's first look at its bytes: node-3 was never observed, never
    found behind its NAT, and node-2 never reached it."""
    watch = EndpointWatch(_publication(MemoryStore()), dict, _view({}), poke=_no_poke, pinned=False)
    shaken = DeviceState(None, None, {}, stats={KEYS["b"]: PeerStats(148, 0, NOW - 1)})
    assert watch._heard(shaken, NOW) == {KEYS["b"]: NOW - 1}, "the handshake took a packet from it"
    assert watch._heard(shaken, NOW + 30) == {KEYS["b"]: NOW - 1}, "nothing since: still heard then, not later"
    rekeyed = DeviceState(None, None, {}, stats={KEYS["b"]: PeerStats(148, 0, NOW + 120)})
    assert watch._heard(rekeyed, NOW + 121) == {KEYS["b"]: NOW + 120}


def test_an_observer_confirms_only_what_it_hears_after_it_saw_the_contest() -> None:
    """The NAT rebinding case: e's NAT maps it to another port, d (which hears it there) says so, and a, behind a
    NAT of its own, hears nothing from e any more. What a heard before it saw the contest must not vouch for e's
    old endpoint, or a's vote ties d's and e is never found again."""

    async def body() -> None:
        publication = await _registered()
        poked: list[tuple[float, str]] = []
        clock = [NOW]
        watch = EndpointWatch(
            publication,
            lambda: NAMES_BY_KEY,
            _view({}),
            poke=lambda address: poked.append((clock[0], str(address))),
            pinned=False,
        )

        def device(received: int) -> DeviceState:
            state = _device({"e": _home("e")})
            return DeviceState(state.public_key, None, state.peers, stats={KEYS["e"]: PeerStats(received, 0, NOW)})

        await watch.publish(device(100), now=NOW)
        await watch.publish(device(148), now=NOW + 2)  # heard, before anyone disputed e
        watch._view = _view({"d": {"e": "203.0.113.66:4444"}})
        for at in (4, 6, 8, 30):  # the contest seen at 4; nothing heard since: e is poked, every POKE_EVERY s
            clock[0] = NOW + at
            await watch.publish(device(148), now=NOW + at)
        assert publication._observed == (), "vouched for e with what it heard before the contest"
        assert poked == [(NOW + 4, "10.96.0.5"), (NOW + 8, "10.96.0.5"), (NOW + 30, "10.96.0.5")]
        clock[0] = NOW + 32
        await watch.publish(device(196), now=NOW + 32)  # e heard (its keepalive) after the contest began
        assert list(publication._observed) == [("e", Endpoint.parse(_home("e")))]
        clock[0] = NOW + 40
        await watch.publish(device(196), now=NOW + 40)
        assert len(poked) == 3, "a confirmed node is not poked"

    run(body())
