"""The registrar's publication and lease parts on the memory store: our record taken over from a previous run,
never someone else's, written back when changed, its claims too; a lease held until etcd drops it, and handed
over to the next run on a restart."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from prometheus_client import CollectorRegistry

from helpers import run
from unit.stage_parts import SCHEMA, record
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.lease import LeaseKeeper
from warren_mesh.agent.publication import RecordPublisher, Registration
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.allocation import RegistrationConflict
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import MeshConfig, NodeRecord, encode_json
from warren_mesh.values.watch import KeyValue

SETTINGS = RegistrationSettings("n1", (), None, 10, None)


def _publisher(store: MemoryStore, key: NodeKey) -> RecordPublisher:
    return RecordPublisher(
        SETTINGS,
        store=store,
        schema=SCHEMA,
        identity=Identity(key),
        endpoint_hosts=(ipaddress.ip_address("192.0.2.7"),),
    )


async def _registered(store: MemoryStore, publisher: RecordPublisher) -> tuple[int, NodeRecord]:
    """``publisher``'s record published on a fresh lease and registered: the lease and the record."""
    lease = await store.grant_lease(10)
    ours = await publisher.publish(publisher.record(MeshConfig(), (ipaddress.ip_address("10.96.0.9"),), ()), lease)
    publisher.registered(Registration(ours, lease, 10))
    return lease, ours


async def _restart(store: MemoryStore) -> tuple[NodeRecord, int, RecordPublisher, int]:
    """n1 starting again: the record a previous run left on a lease still alive, that lease, the new run's
    publisher (with the same key) and its fresh lease."""
    key = NodeKey.generate()
    previous = record("n1", 1, key=key.public_key)
    old_lease = await store.grant_lease(30)
    await store.put(SCHEMA.node("n1"), encode_json(previous.to_json()), lease=old_lease)
    return previous, old_lease, _publisher(store, key), await store.grant_lease(10)


async def _record(store: MemoryStore) -> NodeRecord | None:
    kv = await store.get(SCHEMA.node("n1"))
    return None if kv is None else NodeRecord.from_json(decode_json(kv.value), key_name="n1")


def test_our_record_from_a_previous_run_is_taken_over_and_someone_elses_never() -> None:
    async def body() -> None:
        store = MemoryStore()
        previous, old_lease, publisher, lease = await _restart(store)
        ours = publisher.record(MeshConfig(), previous.overlay_ips, previous.allowed_ips)
        published = await publisher.publish(ours, lease)
        # Behind NAT, the endpoint peers saw us at (in the old record) wins over the one this run found.
        assert published.endpoint == previous.endpoint and publisher.public_endpoint == previous.endpoint
        kv = await store.get(SCHEMA.node("n1"))
        assert kv is not None and kv.lease == lease and await store.lease_time_left(old_lease) == -1
        with pytest.raises(RegistrationConflict, match="another public key"):
            await _publisher(store, NodeKey.generate()).publish(ours, lease)

    run(body())


def test_our_record_and_claims_are_written_back_when_someone_else_touches_them() -> None:
    async def body() -> None:
        store = MemoryStore()
        key = NodeKey.generate()
        publisher = _publisher(store, key)
        lease, ours = await _registered(store, publisher)
        await store.put(SCHEMA.node("n1"), b'{"forged": true}', lease=lease)
        await publisher.restore(b'{"forged": true}')
        assert await _record(store) == ours
        await publisher.restore(encode_json(ours.to_json()))  # our own value: nothing to do
        claim = SCHEMA.claim("n1", "10.96.0.9")
        assert publisher.claim_keys == (claim,)
        await publisher.restore_claim(claim, None)
        assert await store.get(claim) is not None
        # The config's listen port changed: published again on the same lease.
        await publisher.republish(MeshConfig(listen_port=51999))
        again = await _record(store)
        assert again is not None and again.listen_port == 51999 and again.endpoint.port == 51999

    run(body())


def test_a_lease_is_held_until_etcd_drops_it_and_handed_over_on_a_restart() -> None:
    async def body() -> None:
        store = MemoryStore()
        leases = LeaseKeeper(store, AgentMetrics(CollectorRegistry()))
        lease, holder = await leases.grant(10)
        leases.adopt(holder)
        await store.put(SCHEMA.node("n1"), b"{}", lease=lease)
        await store.advance(60)
        assert await store.lease_time_left(lease) > 0, "a held lease lives"
        await store.set_available(False)
        await store.advance(11)
        await store.set_available(True)
        await store.advance(0)
        await leases.lost()  # returns: etcd dropped it while we could not refresh it
        assert await store.get(SCHEMA.node("n1")) is None
        # A restart: the record moves onto a lease of the grace period that nobody refreshes.
        lease, holder = await leases.grant(10)
        leases.adopt(holder)
        await store.put(SCHEMA.node("n1"), b"{}", lease=lease)
        await leases.hand_over(SCHEMA.node("n1"), lease, 30)
        kv = await store.get(SCHEMA.node("n1"))
        assert kv is not None and kv.lease != lease and await store.lease_time_left(kv.lease) == 30
        assert await store.lease_time_left(lease) == -1
        await store.advance(31)
        assert await store.get(SCHEMA.node("n1")) is None, "no next run came: it expired"

    run(body())


def test_our_own_earlier_write_seen_late_is_not_taken_for_someone_elses(caplog: pytest.LogCaptureFixture) -> None:
    # Issue 28: an agent adopting an endpoint logged "changed by someone else" right after its own writes: the watch
    # delivered its first write after the second had been made, and the first's value was no longer "ours".
    async def body() -> None:
        store = MemoryStore()
        publisher = _publisher(store, NodeKey.generate())
        lease, _ours = await _registered(store, publisher)
        await publisher.set_observed((("n2", Endpoint.parse("192.0.2.2:40000")),))
        first = await store.get(SCHEMA.node("n1"))
        assert first is not None
        await publisher.set_public_endpoint(Endpoint.parse("198.51.100.1:51820"))
        revision = store.revision
        await publisher.restore(first.value, first.mod_revision)  # our first write, seen after the second
        assert store.revision == revision and "by someone else" not in caplog.text
        # Someone else's write after ours is still written over.
        await store.put(SCHEMA.node("n1"), b'{"forged": true}', lease=lease)
        await publisher.restore(b'{"forged": true}', store.revision)
        latest = await _record(store)
        assert latest is not None and latest.endpoint == Endpoint.parse("198.51.100.1:51820")
        assert "changed by someone else" in caplog.text

    run(body())


class _SlowAnswers(MemoryStore):
    """A store that has written a put before its answer reaches the writer (as the watch may show it first)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.answer.set()

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        revision = await super().put(key, value, lease=lease)
        await self.answer.wait()
        return revision


def test_our_own_write_seen_before_its_answer_is_not_taken_for_someone_elses(caplog: pytest.LogCaptureFixture) -> None:
    # Issue 28, the lab's NAT test: the watch showed an agent's write while the put's answer was still on its way,
    # and the agent took it for someone else's, wrote its record again and logged so (twice per adoption).
    async def body() -> None:
        store = _SlowAnswers()
        publisher = _publisher(store, NodeKey.generate())
        _lease, _ours = await _registered(store, publisher)
        store.answer.clear()
        writing = asyncio.ensure_future(publisher.set_public_endpoint(Endpoint.parse("198.51.100.1:51820")))
        await asyncio.sleep(0)
        seen = await store.get(SCHEMA.node("n1"))
        assert seen is not None and b"198.51.100.1" in seen.value
        revision = store.revision
        # The watch's news of our write, before its answer (a write of restore's would wait for it too: bounded).
        await asyncio.wait_for(publisher.restore(seen.value, seen.mod_revision), 1)
        store.answer.set()
        await writing
        assert store.revision == revision and "by someone else" not in caplog.text

    run(body())


class _LeaseRunsOutMeanwhile(MemoryStore):
    """A store where a record's lease runs out right after a create found the record there."""

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue | None:
        existing = await super().create(key, value, lease=lease)
        if existing is not None and existing.lease:
            await self.revoke_lease(existing.lease)
        return existing


def test_our_previous_record_gone_while_we_take_it_over_is_written_anew() -> None:
    # Issue 31: in a storm of 1,000 agents a restarting agent found its previous run's record, whose lease then
    # ran out before the takeover's compare-and-swap; the swap's "nothing there" answer was read as a record it
    # could not understand, and the agent ended.
    async def body() -> None:
        store = _LeaseRunsOutMeanwhile()
        previous, _, publisher, lease = await _restart(store)
        published = await publisher.publish(publisher.record(MeshConfig(), previous.overlay_ips, ()), lease)
        kv = await store.get(SCHEMA.node("n1"))
        assert kv is not None and kv.lease == lease
        assert NodeRecord.from_json(decode_json(kv.value), key_name="n1") == published

    run(body())
