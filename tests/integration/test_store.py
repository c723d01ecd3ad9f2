"""The etcd store against a real etcd: transactions, leases, and a watch that never skips a revision."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from helpers import run, wait_until
from warren_mesh.lab.etcd_server import EtcdServer, free_port
from warren_mesh.store.base import LeaseNotFound, StoreUnavailable
from warren_mesh.store.etcd import EtcdStore, parse_endpoints, prefix_range_end
from warren_mesh.watch import Events, Snapshot, WatchResult


def test_endpoint_parsing() -> None:
    parsed = parse_endpoints("http://10.0.0.1:2379, https://etcd.example:2380,127.0.0.1")
    assert [(e.target, e.secure) for e in parsed] == [
        ("10.0.0.1:2379", False),
        ("etcd.example:2380", True),
        ("127.0.0.1:2379", False),
    ]
    with pytest.raises(ValueError, match="not of the form"):
        parse_endpoints("ftp://x:1")
    assert prefix_range_end(b"/a/") == b"/a0"


def test_create_replace_and_delete_are_conditional(shared_etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        store = EtcdStore(shared_etcd.endpoint)
        key = f"{prefix}/k"
        assert await store.create(key, b"one") is None
        held = await store.create(key, b"two")
        assert held is not None and held.value == b"one"
        assert await store.replace(key, b"three", mod_revision=held.mod_revision) is None
        stale = await store.replace(key, b"four", mod_revision=held.mod_revision)
        assert stale is not None and stale.value == b"three"
        assert not await store.delete_if(key, mod_revision=held.mod_revision)
        assert await store.delete_if(key, mod_revision=stale.mod_revision)
        assert await store.get(key) is None
        await store.close()

    run(scenario())


def test_leased_key_expires_and_keepalive_reports_loss(shared_etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        store = EtcdStore(shared_etcd.endpoint)
        lease = await store.grant_lease(2)
        await store.put(f"{prefix}/leased", b"x", lease=lease)
        assert await store.keepalive(lease) == 2
        assert 0 < await store.lease_time_left(lease) <= 2
        await asyncio.sleep(3.2)
        assert await store.get(f"{prefix}/leased") is None
        assert await store.keepalive(lease) == 0
        assert await store.lease_time_left(lease) == -1
        await store.revoke_lease(lease)  # revoking a lost lease is harmless
        with pytest.raises(LeaseNotFound):
            await store.put(f"{prefix}/leased", b"x", lease=lease)
        await store.close()

    run(scenario())


def test_a_keepalive_cut_by_its_deadline_is_reported_as_unavailable(shared_etcd: EtcdServer) -> None:
    """Deadlines shorter than a round trip end calls at every point of the exchange, also between gRPC's own
    steps, where grpc.aio raised errors of its own (ExecuteBatchError, a few in a thousand): each such error ended
    the agent's keepalive task and so the agent (seen with a thousand agents on two cores)."""

    async def scenario() -> None:
        store = EtcdStore(shared_etcd.endpoint)
        lease = await store.grant_lease(60)
        outcomes = {"ok": 0, "unavailable": 0}
        for deadline in (0.0005, 0.001, 0.002, 0.003, 0.005):
            store._call_timeout = deadline
            for _ in range(300):
                try:
                    await store.keepalive(lease)
                    outcomes["ok"] += 1
                except StoreUnavailable:
                    outcomes["unavailable"] += 1
        assert outcomes["unavailable"] > 0  # the deadlines did cut calls short
        store._call_timeout = 5.0
        await store.revoke_lease(lease)
        await store.close()

    run(scenario())


@contextlib.asynccontextmanager
async def collecting(watch: AsyncIterator[WatchResult]) -> AsyncIterator[list[WatchResult]]:
    """Consume ``watch`` in the background into a list; stop consuming when the block ends."""
    results: list[WatchResult] = []

    async def consume() -> None:
        async for result in watch:
            results.append(result)

    task = asyncio.create_task(consume())
    try:
        yield results
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _keys_seen(results: list[WatchResult]) -> dict[str, bytes | None]:
    """Fold results the way a consumer does: a snapshot replaces, events patch."""
    state: dict[str, bytes | None] = {}
    for result in results:
        if isinstance(result, Snapshot):
            state = {kv.key: kv.value for kv in result.items}
        else:
            for event in result.events:
                state[event.kv.key] = event.kv.value if event.kind == "put" else None
    return {k: v for k, v in state.items() if v is not None}


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    await wait_until(condition, timeout, "the watch to deliver")


def test_observe_lists_then_watches(shared_etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        store = EtcdStore(shared_etcd.endpoint)
        await store.put(f"{prefix}/a", b"1")
        async with collecting(store.observe(f"{prefix}/")) as results:
            await _until(lambda: bool(results))
            assert isinstance(results[0], Snapshot) and [kv.key for kv in results[0].items] == [f"{prefix}/a"]
            await store.put(f"{prefix}/b", b"2")
            await store.delete(f"{prefix}/a")
            await store.put(f"{prefix}x/outside", b"not ours")
            await _until(lambda: _keys_seen(results) == {f"{prefix}/b": b"2"})
            assert all(isinstance(r, Events) for r in results[1:])
        await store.close()

    run(scenario())


def test_watch_survives_etcd_restart_and_compaction_without_missing_a_change(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        restarts: list[str] = []
        store = EtcdStore(etcd.endpoint, call_timeout=2.0)
        writer = EtcdStore(etcd.endpoint, call_timeout=2.0)
        async with collecting(store.observe(f"{prefix}/", quiet_interval=1.0, on_restart=restarts.append)) as results:
            await writer.put(f"{prefix}/before", b"1")
            await _until(lambda: f"{prefix}/before" in _keys_seen(results))

            # etcd goes away; changes made while the watcher is disconnected must still arrive.
            await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(1.5)
            await asyncio.to_thread(etcd.start)
            await writer.put(f"{prefix}/during", b"2")
            await _until(lambda: f"{prefix}/during" in _keys_seen(results), timeout=20)
            assert "error" in restarts or "stalled" in restarts
            assert not any(isinstance(r, Snapshot) for r in results[1:]), "a resume needs no new snapshot"

            # Compaction past the watcher's position while it is away forces a fresh snapshot with the truth.
            await asyncio.to_thread(etcd.stop)
            await asyncio.to_thread(etcd.start)
            await writer.delete(f"{prefix}/before")
            revision = await writer.put(f"{prefix}/after", b"3")
            await writer.compact(revision)
            expected = {f"{prefix}/during": b"2", f"{prefix}/after": b"3"}
            await _until(lambda: _keys_seen(results) == expected, timeout=20)
        await store.close()
        await writer.close()

    run(scenario())


def test_compaction_during_an_open_watch_relists(etcd: EtcdServer, prefix: str) -> None:
    """A watcher that resumes from a compacted revision gets a snapshot instead of a silent gap."""

    async def scenario() -> None:
        store = EtcdStore(etcd.endpoint, call_timeout=2.0)
        writer = EtcdStore(etcd.endpoint)
        watch = store.observe(f"{prefix}/", quiet_interval=0.5)
        first = await anext(watch)
        assert isinstance(first, Snapshot)
        # While nobody reads, the world moves on and history is compacted away.
        for i in range(5):
            await writer.put(f"{prefix}/k{i}", str(i).encode())
        await writer.delete(f"{prefix}/k0")
        revision = await writer.put(f"{prefix}/k9", b"9")
        await writer.compact(revision)
        await asyncio.to_thread(etcd.restart)  # drop the stream so the resume hits the compaction
        async with collecting(watch) as results:
            expected = {f"{prefix}/k{i}": str(i).encode() for i in (1, 2, 3, 4, 9)}
            await _until(lambda: _keys_seen([first, *results]) == expected, timeout=20)
            assert any(isinstance(r, Snapshot) for r in results)
        await store.close()
        await writer.close()

    run(scenario())


def test_a_hung_etcd_is_detected_as_a_stalled_watch(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        restarts: list[str] = []
        store = EtcdStore(etcd.endpoint, call_timeout=1.0)
        writer = EtcdStore(etcd.endpoint)
        async with collecting(store.observe(f"{prefix}/", quiet_interval=0.5, on_restart=restarts.append)) as results:
            await _until(lambda: bool(results))
            etcd.pause()
            try:
                await _until(lambda: "stalled" in restarts, timeout=10)
            finally:
                etcd.resume()
            await writer.put(f"{prefix}/after", b"1")
            await _until(lambda: f"{prefix}/after" in _keys_seen(results), timeout=20)
        await store.close()
        await writer.close()

    run(scenario())


def test_fails_over_to_the_next_endpoint(shared_etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        dead = f"http://127.0.0.1:{free_port()}"
        health: list[bool] = []
        store = EtcdStore([dead, shared_etcd.endpoint], call_timeout=2.0, on_health=health.append)
        with pytest.raises(StoreUnavailable):
            await store.put(f"{prefix}/x", b"1")
        await store.put(f"{prefix}/x", b"1")  # the second endpoint
        assert store.endpoint.endswith(str(shared_etcd.client_port))
        assert health[-1] is True
        await store.close()

    run(scenario())
