"""Registration against a real etcd: one revision for a first start, a stable address, and the fallbacks when
the address or the record is not where the fast path expects it."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from helpers import run
from integration.agents import Mesh, in_mesh
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.registrar import Registrar
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.allocation import AddressSpaceExhausted
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.records import MeshConfig, NodeRecord, PodNetwork, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

KEY = NodeKey.generate()
IPV4 = {"family": "ipv4"}  # the label of per-family gauges


def registrar(
    store: EtcdStore, schema: KeySchema, name: str = "n1", key: NodeKey = KEY, lease_ttl: int = 30
) -> Registrar:
    return Registrar(
        RegistrationSettings(name, ("192.0.2.1",), 51820, lease_ttl),
        store=store,
        schema=schema,
        identity=Identity(key),
        endpoint_hosts=(ipaddress.ip_address("192.0.2.1"),),
        metrics=AgentMetrics(CollectorRegistry()),
    )


def _first_choice(name: str, size: int) -> int:
    """Where the registrar starts looking for a free address for ``name`` (registrar._candidates)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % size


def with_store(etcd: EtcdServer, scenario: Callable[[EtcdStore], Awaitable[None]]) -> None:
    async def wrapped() -> None:
        store = etcd.admin_store()
        try:
            await scenario(store)
        finally:
            await store.close()

    run(wrapped())


def test_a_first_start_claims_and_publishes_in_one_revision(shared_etcd: EtcdServer, prefix: str) -> None:
    schema = KeySchema(prefix)

    async def scenario(store: EtcdStore) -> None:
        registration = await registrar(store, schema).register(MeshConfig())
        ip = registration.record.overlay_ip
        reservation = await store.get(schema.claim("n1", str(ip)))
        record = await store.get(schema.node("n1"))
        assert reservation is not None and reservation.lease == 0
        assert record is not None and record.lease == registration.lease_id
        assert reservation.create_revision == record.create_revision  # one transaction: peers see one event
        assert NodeRecord.from_json(decode_json(record.value), key_name="n1").overlay_ip == ip

        # A restart keeps the address and moves the record to its new lease without deleting it.
        again = await registrar(store, schema).register(MeshConfig())
        moved = await store.get(schema.node("n1"))
        assert again.record.overlay_ip == ip and again.lease_id != registration.lease_id
        assert moved is not None and moved.lease == again.lease_id
        assert moved.create_revision == record.create_revision
        assert await store.lease_time_left(registration.lease_id) == -1  # the old lease was let go

    with_store(shared_etcd, scenario)


def test_a_stop_with_a_restart_grace_leaves_the_record_for_the_next_run(shared_etcd: EtcdServer, prefix: str) -> None:
    """A pod restart (--restart-grace): the record outlives the stopped agent on a lease nobody renews, and the
    next run takes it over without a delete (peers never drop the node); without a next run it expires."""
    schema = KeySchema(prefix)

    async def scenario(store: EtcdStore) -> None:
        first = registrar(store, schema, lease_ttl=5)
        registration = await first.register(MeshConfig())
        before = await store.get(schema.node("n1"))
        assert before is not None
        await first.hand_over(20)
        kept = await store.get(schema.node("n1"))
        assert kept is not None and kept.create_revision == before.create_revision  # never deleted
        assert kept.lease not in (0, registration.lease_id)
        assert 15 <= await store.lease_time_left(kept.lease) <= 20
        assert await store.lease_time_left(registration.lease_id) == -1  # the renewed lease is let go

        second = await registrar(store, schema, lease_ttl=5).register(MeshConfig())
        taken = await store.get(schema.node("n1"))
        assert taken is not None and taken.lease == second.lease_id
        assert taken.create_revision == before.create_revision
        assert second.record.overlay_ip == registration.record.overlay_ip
        assert await store.lease_time_left(kept.lease) == -1

        # No next run: the grace is all the node gets.
        other = registrar(store, schema, "n2", NodeKey.generate(), lease_ttl=5)
        await other.register(MeshConfig())
        await other.hand_over(2)
        assert await store.get(schema.node("n2")) is not None

        async def expired() -> bool:
            return await store.get(schema.node("n2")) is None

        await wait_until(expired, 10, "the handed-over record to expire", interval=0.2)

    with_store(shared_etcd, scenario)


def test_an_address_taken_after_listing_moves_on_to_the_next(shared_etcd: EtcdServer, prefix: str) -> None:
    schema = KeySchema(prefix)
    config = MeshConfig(overlay_cidrs=(ipaddress.ip_network("10.9.0.0/30"),))  # two usable addresses: .1 and .2

    async def scenario(store: EtcdStore) -> None:
        # "first" is a name whose first choice is n1's: they collide on it.
        first_name = next(f"first{i}" for i in range(100) if _first_choice(f"first{i}", 2) == _first_choice("n1", 2))
        before = (await store.list_prefix(schema.claims)).revision
        first = await registrar(store, schema, first_name, NodeKey.generate()).register(config)
        mine = registrar(store, schema)
        listing = store.list_prefix

        async def listed_before_first_claimed(prefix: str, *, created_after: int = 0) -> Snapshot:
            # The first listing (what is free?) was at a revision before "first" claimed; the check after our
            # claim (the claims made since) is real.
            store.list_prefix = listing  # type: ignore[method-assign]
            return Snapshot((), before)

        store.list_prefix = listed_before_first_claimed  # type: ignore[method-assign]
        registration = await mine.register(config)
        # n1 claimed first's address (it listed before), saw the older claim, withdrew, and claimed the other.
        held = await store.list_prefix(f"{schema.claims_of('n1')}overlay/")
        assert [kv.key for kv in held.items] == [schema.claim("n1", str(registration.record.overlay_ip))]
        taken = {first.record.overlay_ip, registration.record.overlay_ip}
        assert taken == {ipaddress.ip_address("10.9.0.1"), ipaddress.ip_address("10.9.0.2")}
        with pytest.raises(AddressSpaceExhausted, match=r"every address in the mesh network 10\.9\.0\.0/30"):
            await registrar(store, schema, "third", NodeKey.generate()).register(config)
        assert await store.get(schema.node("third")) is None  # nothing published without an address

    with_store(shared_etcd, scenario)


def test_a_record_whose_claim_was_lost_is_claimed_again_and_taken_over(shared_etcd: EtcdServer, prefix: str) -> None:
    schema = KeySchema(prefix)

    async def scenario(store: EtcdStore) -> None:
        before = await registrar(store, schema).register(MeshConfig())
        await store.delete_prefix(schema.claims)  # an admin wiped the claims; the record is still alive
        after = await registrar(store, schema).register(MeshConfig())
        reservation = await store.get(schema.claim("n1", str(after.record.overlay_ip)))
        record = await store.get(schema.node("n1"))
        assert reservation is not None
        assert record is not None and record.lease == after.lease_id
        assert after.record.overlay_ip == before.record.overlay_ip  # the name hashes to the same first choice

    with_store(shared_etcd, scenario)


def test_the_lease_is_kept_alive_from_its_grant_while_registration_is_slow(
    shared_etcd: EtcdServer, prefix: str
) -> None:
    """With a thousand nodes starting at once, writing the record took seconds after the lease was granted; a
    lease first refreshed after registering expired before that, and the node flapped out of the mesh."""
    schema = KeySchema(prefix)

    class SlowStore(EtcdStore):
        async def create_all(self, items: Sequence[tuple[str, bytes, int]]) -> list[KeyValue | None] | None:
            await asyncio.sleep(3.0)  # longer than the lease's TTL
            return await super().create_all(items)

    async def scenario() -> None:
        store = SlowStore(shared_etcd.endpoint, tls=shared_etcd.client_tls())
        try:
            slow = registrar(store, schema, name="slow", key=NodeKey.generate(), lease_ttl=2)
            registration = await slow.register(MeshConfig())
            record = await store.get(schema.node("slow"))
            assert record is not None and record.lease == registration.lease_id
            await asyncio.sleep(2.5)  # past another TTL: the refreshes go on after registering
            assert await store.lease_time_left(registration.lease_id) > 0
            await slow.deregister()
            assert await store.get(schema.node("slow")) is None
        finally:
            await store.close()

    run(scenario())


def test_fifty_agents_booted_at_once_get_fifty_distinct_pod_subnets(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    async def scenario(mesh: Mesh) -> None:
        for i in range(50):
            mesh.start(f"n{i}")
        await wait_until(lambda: all(a.registrar and a.registrar.current for a in mesh.agents.values()), 60, "50")
        records = [a.registrar.current.record for a in mesh.agents.values() if a.registrar and a.registrar.current]
        subnets = [r.allowed_ips for r in records]
        pods = ipaddress.ip_network("10.244.0.0/16")
        assert all(len(s) == 1 and s[0].prefixlen == 24 and s[0].overlaps(pods) for s in subnets)
        assert len({s[0] for s in subnets}) == 50, "two nodes share a pod subnet"
        assert len({r.overlay_ip for r in records}) == 50
        await mesh.converged(timeout=60)

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_a_full_pod_network_leaves_the_last_node_without_pods_and_says_so(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schema = KeySchema(prefix)
    config = MeshConfig(pod_networks=(PodNetwork(ipaddress.ip_network("10.250.0.0/22"), 24),))  # four /24s

    async def scenario(mesh: Mesh) -> None:
        admin = shared_etcd.admin_store()
        await admin.put(schema.config, encode_json(config.to_json()))
        await admin.close()
        for i in range(5):
            mesh.start(f"n{i}")
        await mesh.converged(timeout=30)  # the fifth joins the mesh all the same
        subnets = {
            n: a.registrar.current.record.allowed_ips
            for n, a in mesh.agents.items()
            if a.registrar and a.registrar.current
        }
        without = [n for n, s in subnets.items() if not s]
        assert len(without) == 1 and len({s for s in subnets.values() if s}) == 4
        assert mesh.metric(without[0], "warren_mesh_pod_subnet_missing", {"family": "ipv4"}) == 1
        assert all(mesh.metric(n, "warren_mesh_pod_subnet_missing", IPV4) == 0 for n in subnets if n not in without)
        assert f"no pod subnet for {without[0]}: every /24 of the pod network 10.250.0.0/22 is claimed" in caplog.text

    in_mesh(shared_etcd, prefix, tmp_path, scenario)
