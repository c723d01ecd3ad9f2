"""The registrar's logic on the memory store, whose clock the test drives: leases that run out exactly when the
test says, an etcd that goes away on request. The same logic against a real etcd: tests/integration."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from helpers import run
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.observer import Observed
from warren_mesh.agent.registrar import Registrar
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh import allocation
from warren_mesh.mesh.allocation import AddressSpaceExhausted, RegistrationConflict
from warren_mesh.mesh.changes import Changes
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.topology import build_topology
from warren_mesh.mesh.view import MeshView
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.base import Store, StoreUnavailable
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.records import MeshConfig, NodeRecord, PodNetwork, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Events, Snapshot

SCHEMA = KeySchema("/m")


def registrar(
    store: Store, name: str = "n1", key: NodeKey | None = None, ttl: int = 10, pod_subnet: str | None = None
) -> Registrar:
    pinned = ipaddress.ip_network(pod_subnet) if pod_subnet else None
    return Registrar(
        RegistrationSettings(name, ("192.0.2.1",), 51820, ttl, pinned),
        store=store,
        schema=SCHEMA,
        identity=Identity(key or NodeKey.generate()),
        endpoint_hosts=(ipaddress.ip_address("192.0.2.1"),),
        metrics=AgentMetrics(CollectorRegistry()),
    )


def scenario(body: Callable[[MemoryStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = MemoryStore()
        try:
            await body(store)
        finally:
            await store.close()

    run(main())


def test_the_memory_store_keeps_etcds_promises() -> None:
    async def body(store: MemoryStore) -> None:
        assert await store.create("/a", b"1") is None
        held = await store.create("/a", b"2")
        assert held is not None and held.value == b"1"
        first = await store.get("/a")
        assert first is not None and first.create_revision == first.mod_revision == 2
        await store.put("/a", b"3")
        second = await store.get("/a")
        assert second is not None and second.create_revision == 2 and second.mod_revision == 3
        assert await store.replace("/a", b"4", mod_revision=2) is not None  # stale: refused
        assert await store.replace("/a", b"4", mod_revision=3) is None
        lease = await store.grant_lease(5)
        await store.put("/b", b"x", lease=lease)
        stream = store.observe("/")
        snapshot = await anext(stream)
        assert isinstance(snapshot, Snapshot) and [kv.key for kv in snapshot.items] == ["/a", "/b"]
        await store.advance(6)  # nobody holds the lease: it expires, and its key with it
        events = await anext(stream)
        assert isinstance(events, Events) and [(e.kind, e.kv.key) for e in events.events] == [("delete", "/b")]
        assert await store.lease_time_left(lease) == -1
        await store.put("/c", b"y")
        await store.compact(store.revision)
        restarts: list[str] = []
        late = store.observe("/", on_restart=restarts.append)
        assert isinstance(await anext(late), Snapshot)
        await stream.aclose()
        await late.aclose()

    scenario(body)


def test_a_held_lease_lives_and_an_unheld_one_dies_with_its_record() -> None:
    async def body(store: MemoryStore) -> None:
        r = registrar(store)
        registration = await r.register(MeshConfig())
        await store.advance(60)  # held by the registrar's keepalive: still there
        assert await store.get(SCHEMA.node("n1")) is not None
        await r.deregister()  # revoked: gone at once
        assert await store.get(SCHEMA.node("n1")) is None
        # The address is reserved for good: the next run gets it back.
        again = await registrar(store).register(MeshConfig())
        assert again.record.overlay_ip == registration.record.overlay_ip
        await store.advance(0)

    scenario(body)


def test_a_lease_lost_while_etcd_is_away_is_registered_again_at_the_same_address() -> None:
    async def body(store: MemoryStore) -> None:
        r = registrar(store, ttl=10)
        first = await r.register(MeshConfig())
        keeping = asyncio.create_task(r.keep_alive(MeshConfig))
        await store.set_available(False)
        await store.advance(11)  # away longer than the TTL: etcd drops the lease and the record
        assert SCHEMA.node("n1") not in {kv.key for kv in (await _listed(store)).items}
        await store.set_available(True)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if await store.get(SCHEMA.node("n1")) is not None:
                break
        record = await store.get(SCHEMA.node("n1"))
        assert record is not None and record.lease != first.lease_id
        assert NodeRecord.from_json(decode_json(record.value), key_name="n1").overlay_ip == first.record.overlay_ip
        keeping.cancel()
        await r.deregister()

    scenario(body)


async def _listed(store: MemoryStore) -> Snapshot:
    store.available = True
    try:
        return await store.list_prefix(SCHEMA.root)
    finally:
        store.available = False


def test_a_name_held_by_another_key_is_never_overwritten() -> None:
    async def body(store: MemoryStore) -> None:
        await registrar(store, "n1").register(MeshConfig())
        with pytest.raises(RegistrationConflict, match="another public key"):
            await registrar(store, "n1").register(MeshConfig())

    scenario(body)


def test_nodes_never_share_an_address_and_a_full_network_is_a_clear_error() -> None:
    async def body(store: MemoryStore) -> None:
        config = MeshConfig(overlay_cidrs=(ipaddress.ip_network("10.96.0.0/30"),))  # two usable addresses
        first = await registrar(store, "a").register(config)
        second = await registrar(store, "b").register(config)
        assert first.record.overlay_ip != second.record.overlay_ip
        with pytest.raises(AddressSpaceExhausted, match="widen overlayCIDR"):
            await registrar(store, "c").register(config)
        view = MeshView(SCHEMA)
        view.apply(await store.list_prefix(SCHEMA.root))
        assert {r.owner for r in view.reservations.values()} == {"a", "b"}

    scenario(body)


def test_a_deleted_claim_is_written_back_by_its_holder() -> None:
    async def body(store: MemoryStore) -> None:
        r = registrar(store)
        registration = await r.register(MeshConfig())
        record = registration.record
        address_key = SCHEMA.claim("n1", str(record.overlay_ip))
        subnet_key = SCHEMA.claim("n1", str(record.allowed_ips[0]), "pods")
        assert r.publication.claim_keys == (address_key, subnet_key)
        before = await store.get(address_key)
        await r.publication.restore_claim(address_key, b"anything")  # what a claim holds says nothing: nothing to do
        assert await store.get(address_key) == before
        for key in (address_key, subnet_key):
            await store.delete(key)
            await r.publication.restore_claim(key, None)
            assert (await store.get(key)) is not None
        await r.publication.restore_claim(SCHEMA.claim("n2", "10.96.0.9"), None)  # not ours: nothing to do
        assert await store.get(SCHEMA.claim("n2", "10.96.0.9")) is None
        await r.deregister()

    scenario(body)


def test_an_unreachable_store_is_an_error_callers_retry() -> None:
    async def body(store: MemoryStore) -> None:
        await store.set_available(False)
        with pytest.raises(StoreUnavailable):
            await registrar(store).register(MeshConfig())

    scenario(body)


def test_a_subnet_claimed_since_the_listing_by_a_node_that_moved_on_is_not_taken() -> None:
    """After listing, a node whose claim had lost withdraws it and claims the subnet we are about to claim. Its
    claim is older than ours: we must see it, and not take its lost claim (gone, though it was in our listing)
    for the one it holds, which made the new one look surplus and the subnet free (found by a five-node test)."""
    pods = PodNetwork(ipaddress.ip_network("10.250.0.0/22"), 24)
    config = MeshConfig(pod_networks=(pods,))
    lost = "10.250.0.0/24"

    async def body(store: MemoryStore) -> None:
        await store.create(SCHEMA.claim("y", lost, "pods"), b"")
        await store.create(SCHEMA.claim("x", lost, "pods"), b"")  # younger than y's: lost
        ours = str(next(allocation.subnet_candidates("n1", pods, {lost})))
        listing = store.list_prefix

        async def x_moves_on_after_we_listed(prefix: str, *, created_after: int = 0) -> Snapshot:
            snapshot = await listing(prefix, created_after=created_after)
            if prefix == SCHEMA.claims and not created_after:
                store.list_prefix = listing  # type: ignore[method-assign]
                await store.delete(SCHEMA.claim("x", lost, "pods"))
                await store.create(SCHEMA.claim("x", ours, "pods"), b"")
            return snapshot

        store.list_prefix = x_moves_on_after_we_listed  # type: ignore[method-assign]
        registration = await registrar(store).register(config)
        assert [str(n) for n in registration.record.allowed_ips] not in ([ours], [lost])
        held = await store.list_prefix(SCHEMA.claims_of("n1") + "pods/")
        assert [kv.key for kv in held.items] == [SCHEMA.claim("n1", str(registration.record.allowed_ips[0]), "pods")]

    scenario(body)


def test_registering_by_the_agents_own_listing_reads_no_claims_again_and_sees_those_made_since() -> None:
    """At a start the agent lists the mesh once and registers by that listing: no claim is listed again, and an
    address claimed by another node after the listing (older than our claim: it wins) is seen and not taken."""
    config = MeshConfig(overlay_cidrs=(ipaddress.ip_network("10.96.0.0/29"),))

    async def body(store: MemoryStore) -> None:
        held_by_a = (await registrar(store, "a").register(config)).record.overlay_ip
        listed = await store.list_prefix(SCHEMA.root)
        taken = {int(held_by_a)}
        first_free = str(next(allocation.address_candidates("n1", config.overlay_cidrs[0], taken)))
        await store.create(SCHEMA.claim("b", first_free), b"")  # b claims it after our listing
        listing, whole = store.list_prefix, []

        async def counted(prefix: str, *, created_after: int = 0) -> Snapshot:
            if not created_after and prefix in (SCHEMA.root, SCHEMA.claims, SCHEMA.ipam):
                whole.append(prefix)
            return await listing(prefix, created_after=created_after)

        store.list_prefix = counted  # type: ignore[method-assign]
        ours = str((await registrar(store).register(config, listed=listed)).record.overlay_ip)
        assert whole == [] and ours not in (first_free, str(held_by_a))
        view = MeshView(SCHEMA)
        view.apply(await listing(SCHEMA.root))
        assert view.reservations[first_free].owner == "b" and view.reservations[ours].owner == "n1"

    scenario(body)


def test_a_pinned_pod_subnet_is_claimed_if_the_mesh_can_give_it() -> None:
    async def body(store: MemoryStore) -> None:
        key = NodeKey.generate()
        first = await registrar(store, "a", key, pod_subnet="10.244.77.0/24").register(MeshConfig())
        assert [str(n) for n in first.record.allowed_ips] == ["10.244.77.0/24"]
        assert await store.get(SCHEMA.claim("a", "10.244.77.0/24", "pods")) is not None
        again = await registrar(store, "a", key, pod_subnet="10.244.77.0/24").register(MeshConfig())  # a restart
        assert again.record.allowed_ips == first.record.allowed_ips
        for pinned, complaint in (
            ("10.244.77.0/24", "claimed by another node"),  # a's
            ("10.244.78.0/25", r"is not a node subnet of the pod networks \(/24 of 10.244.0.0/16\)"),
            ("10.245.0.0/24", r"is not a node subnet of the pod networks \(/24 of 10.244.0.0/16\)"),
        ):
            with pytest.raises(RegistrationConflict, match=complaint):
                await registrar(store, "b", pod_subnet=pinned).register(MeshConfig())
        assert await store.get(SCHEMA.node("b")) is None  # nothing published for a refused pin

    scenario(body)


def test_an_ipv6_pod_network_gives_each_node_a_64() -> None:
    async def body(store: MemoryStore) -> None:
        config = MeshConfig(pod_networks=(PodNetwork(ipaddress.ip_network("fd00:244::/48"), 64),))
        await store.put(SCHEMA.config, encode_json(config.to_json()))
        assert MeshConfig.from_json(decode_json(encode_json(config.to_json()))) == config
        first = await registrar(store, "a").register(config)
        second = await registrar(store, "b").register(config)
        subnets = [r.record.allowed_ips[0] for r in (first, second)]
        assert all(s.prefixlen == 64 and s.version == 6 and s.overlaps(config.pod_networks[0].cidr) for s in subnets)
        assert subnets[0] != subnets[1]
        view = MeshView(SCHEMA)
        view.apply(await store.list_prefix(SCHEMA.root))
        assert {view.reservations[str(s)].owner for s in subnets} == {"a", "b"}
        # Every agent routes b's /64 to b: its record is accepted whole.
        topology = build_topology(
            local=LocalNode("a", NodeKey.generate().public_key, first.record.overlay_ips, allowed_ips=(subnets[0],)),
            view=view,
            auto_mtu=1420,
        )
        assert str(subnets[1]) in next(iter(topology.peers.values())).allowed_ips and not topology.conflicts

    scenario(body)


DUAL = MeshConfig(
    overlay_cidrs=(ipaddress.ip_network("10.96.0.0/16"), ipaddress.ip_network("fd96::/64")),
    pod_networks=(
        PodNetwork(ipaddress.ip_network("10.244.0.0/16"), 24),
        PodNetwork(ipaddress.ip_network("fd44::/56"), 64),
    ),
)


def test_a_registered_node_claims_the_family_its_mesh_gains_and_keeps_the_first() -> None:
    """The config edit that makes a mesh dual-stack: on the lease it holds, the node claims an IPv6 address and pod
    subnet (one of each), keeps its IPv4 ones, and its record, accepted whole by a peer, carries both."""

    async def body(store: MemoryStore) -> None:
        node = registrar(store, "a")
        first = (await node.register(MeshConfig())).record
        await registrar(store, "b").register(MeshConfig())
        changes = Changes(everything=True)
        await node.follow(Observed(changes, 0, MeshConfig(), {}, {}))
        await store.put(SCHEMA.config, encode_json(DUAL.to_json()))  # the operator's write of the edited Mesh
        await node.follow(Observed(changes, 0, DUAL, {}, {}))
        assert node.current is not None
        record = node.current.record
        assert record.overlay_ips[0] == first.overlay_ip and record.overlay_ips[1] in DUAL.overlay_cidrs[1]
        assert record.allowed_ips[0] == first.allowed_ips[0] and record.allowed_ips[1].prefixlen == 64
        view = MeshView(SCHEMA)
        view.apply(await store.list_prefix(SCHEMA.root))
        claims = {s: r.owner for s, r in view.reservations.items() if r.owner == "a"}
        assert set(claims) == {*record.overlay_texts, *(str(n) for n in record.allowed_ips)}, claims
        assert not view.surplus_claims("a")
        b = view.nodes["b"].record
        topology = build_topology(
            local=LocalNode("b", b.public_key, b.overlay_ips, allowed_ips=b.allowed_ips), view=view, auto_mtu=1420
        )
        assert not topology.conflicts
        assert set(next(iter(topology.peers.values())).allowed_ips) == {
            *(f"{ip}/{ip.max_prefixlen}" for ip in record.overlay_ips),
            *(str(n) for n in record.allowed_ips),
        }

    scenario(body)


def test_a_node_publishes_the_location_the_operator_says_unless_its_flag_pins_one() -> None:
    """docs/topology.md: the operator writes locations/<node> from the Node's topology label; the node publishes it
    in its own record, at registration and when it changes; a value that is no location is refused and the last one
    kept; --location pins the node's own."""

    async def body(store: MemoryStore) -> None:
        await store.put(SCHEMA.location("a"), b"eu-1")
        node = registrar(store, "a")
        assert (await node.register(MeshConfig())).record.location == "eu-1"
        assert SCHEMA.location("a") in node.watched_keys
        changes = Changes(everything=True)
        for value, expected in ((b"eu-2", "eu-2"), (b"not a location!", "eu-2"), (None, None)):
            await node.follow(Observed(changes, 0, MeshConfig(), {SCHEMA.location("a"): value}, {}))
            assert node.current is not None and node.current.record.location == expected, value
            stored = await store.get(SCHEMA.node("a"))
            assert stored is not None
            assert NodeRecord.from_json(decode_json(stored.value), key_name="a").location == expected
        pinned = Registrar(
            RegistrationSettings("p", ("192.0.2.2",), 51820, 10, location="here"),
            store=store,
            schema=SCHEMA,
            identity=Identity(NodeKey.generate()),
            endpoint_hosts=(ipaddress.ip_address("192.0.2.2"),),
            metrics=AgentMetrics(CollectorRegistry()),
        )
        await store.put(SCHEMA.location("p"), b"there")
        assert (await pinned.register(MeshConfig())).record.location == "here"
        await pinned.follow(Observed(changes, 0, MeshConfig(), {SCHEMA.location("p"): b"elsewhere"}, {}))
        assert pinned.current is not None and pinned.current.record.location == "here"

    scenario(body)
