"""Registration against a real etcd: one revision for a first start, a stable address, and the fallbacks when
the address or the record is not where the fast path expects it."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections.abc import Awaitable, Callable, Sequence

import pytest
from prometheus_client import CollectorRegistry

from helpers import run
from warren_mesh.agent.registrar import AddressSpaceExhausted, Registrar
from warren_mesh.keys import NodeKey
from warren_mesh.lab.etcd_server import EtcdServer
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.model import MeshConfig, NodeRecord
from warren_mesh.schema import KeySchema
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.validation import decode_json
from warren_mesh.watch import KeyValue, Snapshot

KEY = NodeKey.generate()


def registrar(
    store: EtcdStore, schema: KeySchema, name: str = "n1", key: NodeKey = KEY, lease_ttl: int = 30
) -> Registrar:
    return Registrar(
        RegistrationSettings(name, "192.0.2.1", 51820, lease_ttl),
        store=store,
        schema=schema,
        key=key,
        endpoint_host=ipaddress.ip_address("192.0.2.1"),
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


def test_an_address_taken_after_listing_moves_on_to_the_next(shared_etcd: EtcdServer, prefix: str) -> None:
    schema = KeySchema(prefix)
    config = MeshConfig(overlay_cidr=ipaddress.ip_network("10.9.0.0/30"))  # two usable addresses: .1 and .2

    async def scenario(store: EtcdStore) -> None:
        # "first" is a name whose first choice is n1's: they collide on it.
        first_name = next(f"first{i}" for i in range(100) if _first_choice(f"first{i}", 2) == _first_choice("n1", 2))
        first = await registrar(store, schema, first_name, NodeKey.generate()).register(config)
        mine = registrar(store, schema)
        listing = store.list_prefix

        async def listed_before_first_claimed(prefix: str) -> Snapshot:
            # The first listing (what is free?) comes before "first" claimed; the check after our claim is real.
            store.list_prefix = listing  # type: ignore[method-assign]
            snapshot = await listing(prefix)
            return Snapshot((), snapshot.revision)

        store.list_prefix = listed_before_first_claimed  # type: ignore[method-assign]
        registration = await mine.register(config)
        # n1 claimed first's address (it listed before), saw the older claim, withdrew, and claimed the other.
        held = await store.list_prefix(schema.claims_of("n1"))
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
