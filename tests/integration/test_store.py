"""The etcd store against a real etcd: transactions, leases, and a watch that never skips a revision."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
from etcd3.etcdrpc import rpc_pb2

from helpers import run
from warren_mesh.store import watcher
from warren_mesh.store.base import LeaseNotFound, StoreUnavailable
from warren_mesh.store.connection import RANGE_ANSWER_BYTES, prefix_range_end, wire_key
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.memory import MemoryStore
from warren_mesh.store.watcher import CATCH_UP_GAP
from warren_mesh.store.wire import WatchAnswer
from warren_mesh.testkit.etcd_server import EtcdServer, find_etcd, free_port
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.decode import MAX_VALUE_BYTES
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.netaddr import parse_endpoints
from warren_mesh.values.watch import Events, Snapshot, WatchResult


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
        store = shared_etcd.admin_store()
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


def test_a_held_lease_lives_and_a_lost_one_is_reported(shared_etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        store = shared_etcd.admin_store()
        lease = await store.grant_lease(2)
        await store.put(f"{prefix}/leased", b"x", lease=lease)
        renewals = 0

        def renewed() -> None:
            nonlocal renewals
            renewals += 1

        holding = asyncio.create_task(store.hold_lease(lease, 2, first_in=0.0, on_renewed=renewed))
        await asyncio.sleep(3.5)  # well past the TTL: only the renewals keep the key
        assert not holding.done() and renewals >= 4
        assert await store.get(f"{prefix}/leased") is not None
        assert 0 < await store.lease_time_left(lease) <= 2
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        await asyncio.sleep(3.2)
        assert await store.get(f"{prefix}/leased") is None
        # Holding a lease etcd no longer has returns (at the first answer) instead of renewing forever.
        await asyncio.wait_for(store.hold_lease(lease, 2, first_in=0.0), timeout=10)
        assert await store.lease_time_left(lease) == -1
        await store.revoke_lease(lease)  # revoking a lost lease is harmless
        with pytest.raises(LeaseNotFound):
            await store.put(f"{prefix}/leased", b"x", lease=lease)
        await store.close()

    run(scenario())


def test_a_held_lease_survives_late_answers_and_a_stuck_etcd_is_reported(etcd: EtcdServer) -> None:
    """Requests keep leaving while answers are outstanding: etcd paused for less than the TTL (no answers at all
    meanwhile) costs the lease nothing. Paused for longer, the stream is given up as stuck (StoreUnavailable,
    whatever gRPC raised inside) and holding again on a new stream reports the lease etcd let expire."""

    async def scenario() -> None:
        store = EtcdStore(etcd.endpoint, call_timeout=1.0)
        lease = await store.grant_lease(4)
        holding = asyncio.create_task(store.hold_lease(lease, 4, first_in=0.0))
        await asyncio.sleep(0.5)
        etcd.pause()
        await asyncio.sleep(2.5)  # two requests go out unanswered
        etcd.resume()
        await asyncio.sleep(1.0)
        assert not holding.done()
        assert await store.lease_time_left(lease) > 0

        etcd.pause()
        try:
            with pytest.raises(StoreUnavailable, match="no keepalive answer"):
                await asyncio.wait_for(holding, timeout=20)
            await asyncio.sleep(3.0)  # the lease is now past its TTL by etcd's clock, too
        finally:
            etcd.resume()
        await asyncio.wait_for(store.hold_lease(lease, 4, first_in=0.0), timeout=20)  # returns: lost
        await store.close()

    run(scenario())


def test_holding_leases_through_an_etcd_restart_fails_only_as_unavailable(etcd: EtcdServer) -> None:
    """An etcd going away ends every keepalive stream mid-exchange; gRPC then raised errors of its own
    (ExecuteBatchError, InvalidStateError) that, escaping, ended an agent's keepalive task and so the agent."""

    async def scenario() -> None:
        stores = [EtcdStore(etcd.endpoint) for _ in range(40)]
        leases = [await store.grant_lease(30) for store in stores]
        tasks = [
            asyncio.create_task(store.hold_lease(lease, 3, first_in=i / 40))
            for i, (store, lease) in enumerate(zip(stores, leases, strict=True))
        ]
        await asyncio.sleep(1.2)
        await asyncio.to_thread(etcd.restart)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
        for store in stores:
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
        store = shared_etcd.admin_store()
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
        store = EtcdStore(
            [dead, shared_etcd.endpoint], tls=shared_etcd.client_tls(), call_timeout=2.0, on_health=health.append
        )
        with pytest.raises(StoreUnavailable):
            await store.put(f"{prefix}/x", b"1")
        await store.put(f"{prefix}/x", b"1")  # the second endpoint
        assert store.endpoint.endswith(str(shared_etcd.client_port))
        assert health[-1] is True
        await store.close()

    run(scenario())


def test_processes_started_while_grpc_is_busy_survive_the_fork(shared_etcd: EtcdServer, prefix: str) -> None:
    """gRPC's fork handlers restarted its poller in the forked child, which then crashed (SIGSEGV) before exec in
    about one fork in fifteen while calls were in flight: the agent starting wireguard-go, the lab starting agents."""

    async def scenario() -> None:
        store = shared_etcd.admin_store()
        await store.put(f"{prefix}/k", b"v")
        done = asyncio.Event()

        async def keep_grpc_busy() -> None:
            while not done.is_set():
                await store.get(f"{prefix}/k")

        busy = asyncio.create_task(keep_grpc_busy())

        def spawn() -> int:
            # A preexec_fn makes subprocess fork (not vfork/posix_spawn), as the lab's in_netns does.
            return subprocess.run(["true"], preexec_fn=lambda: None, check=False).returncode

        codes = [await asyncio.to_thread(spawn) for _ in range(150)]
        done.set()
        await busy
        await store.close()
        assert codes == [0] * len(codes), f"{sum(c != 0 for c in codes)} children died: {sorted(set(codes))}"

    run(scenario())


def test_a_watch_far_behind_catches_up_in_batches(etcd: EtcdServer, prefix: str) -> None:
    """A reader that fell far behind its watch stream (etcd queued one answer per revision for it) resumes the
    watch as soon as etcd tells it how far ahead it is: the backlog then arrives in a few batched answers, with
    no change missed or repeated."""

    async def scenario() -> None:
        store, writer = EtcdStore(etcd.endpoint), EtcdStore(etcd.endpoint)
        restarts: list[str] = []
        watch = store.observe(f"{prefix}/", on_restart=restarts.append)
        assert isinstance(await anext(watch), Snapshot)
        reading = asyncio.ensure_future(anext(watch))  # opens the watch stream and waits for its first change
        await asyncio.sleep(0.5)
        await writer.put(f"{prefix}/k0", b"0")
        first = await reading
        assert isinstance(first, Events)
        # The reader is busy elsewhere while every put below is queued for it as an answer of its own.
        changes = CATCH_UP_GAP * 2 + 100
        for i in range(1, changes + 1):
            await writer.put(f"{prefix}/k{i}", str(i).encode())
        # A lease answer tells the store the revision etcd is at.
        lease = await store.grant_lease(5)
        holding = asyncio.create_task(store.hold_lease(lease, 5, first_in=0.0))
        await wait_until(lambda: store.known_revision >= first.revision + changes, 10, "a lease answer")
        answers: list[Events] = []
        seen: dict[str, bytes] = {}
        while len(seen) < changes:
            result = await asyncio.wait_for(anext(watch), timeout=10)
            assert isinstance(result, Events)
            answers.append(result)
            for event in result.events:
                assert event.kv.key not in seen, "a change delivered twice"
                seen[event.kv.key] = event.kv.value
        assert seen == {f"{prefix}/k{i}": str(i).encode() for i in range(1, changes + 1)}
        revisions = [event.kv.mod_revision for result in answers for event in result.events]
        assert revisions == list(range(first.revision + 1, first.revision + changes + 1)), "in order, none skipped"
        assert restarts == ["behind"]
        assert len(answers) <= 5, f"{len(answers)} answers for {changes} queued changes: not caught up in batches"
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        await watch.aclose()
        await store.close()
        await writer.close()

    run(scenario())


def test_a_listing_is_paged_and_skips_values_too_large_to_be_records(etcd: EtcdServer, prefix: str) -> None:
    """Any node may write values of up to etcd's 1.5 MiB under its own keys. A listing reads pages no larger than
    RANGE_ANSWER_BYTES; a value over that is skipped by its key (never fetched), one over the record limit but
    under it is dropped while decoding; both are listed with ``oversize`` and an empty value, the rest intact."""

    async def scenario() -> None:
        store = EtcdStore(etcd.endpoint)
        small = {f"{prefix}/n{i:04}": f"record {i}".encode() for i in range(1500)}
        for key, value in small.items():
            await store.put(key, value)
        big = {f"{prefix}/n0100x": 1_300_000, f"{prefix}/n0101x": 1_300_000, f"{prefix}/n0900x": RANGE_ANSWER_BYTES}
        over_record = {f"{prefix}/n0500x": MAX_VALUE_BYTES + 1}
        for key, size in {**big, **over_record}.items():
            await store.put(key, b"v" * size)
        revision = await store.put(f"{prefix}/last", b"z")

        listed = await store.list_prefix(f"{prefix}/")
        assert listed.revision == revision
        by_key = {kv.key: kv for kv in listed.items}
        assert [kv.key for kv in listed.items] == sorted([*small, *big, *over_record, f"{prefix}/last"])
        assert {k: by_key[k].value for k in small} == small
        assert {k: by_key[k].oversize for k in big} == dict.fromkeys(big, RANGE_ANSWER_BYTES)
        assert by_key[f"{prefix}/n0500x"].oversize == MAX_VALUE_BYTES + 1
        assert all(by_key[k].value == b"" for k in [*big, *over_record])
        one = await store.get(f"{prefix}/n0100x")
        assert one is not None and (one.value, one.oversize) == (b"", RANGE_ANSWER_BYTES)
        await store.close()

    run(scenario())


def test_a_listing_of_the_keys_made_since_a_revision(shared_etcd: EtcdServer, prefix: str) -> None:
    """``created_after``: only keys created after that revision, over pages (etcd filters before it pages), the
    same on the memory store; a key written again since (created before) is not among them."""

    async def listed(store: EtcdStore | MemoryStore) -> tuple[list[str], list[str]]:
        old = [f"{prefix}/k{i:04}" for i in range(0, 1400, 2)]
        for key in old:
            await store.put(key, b"old")
        since = await store.put(f"{prefix}/k9999", b"old")
        made = [f"{prefix}/k{i:04}" for i in range(1, 1400, 2)]  # between the old ones, over three pages
        for key in made:
            await store.put(key, b"new")
        await store.put(old[5], b"written again")
        await store.delete(made[0])
        listing = await store.list_prefix(f"{prefix}/", created_after=since)
        assert listing.revision == (await store.list_prefix(f"{prefix}/")).revision
        await store.delete_prefix(f"{prefix}/")
        return [kv.key for kv in listing.items], made[1:]

    async def scenario() -> None:
        store = shared_etcd.admin_store()
        try:
            found, expected = await listed(store)
        finally:
            await store.close()
        assert found == expected
        memory_found, _ = await listed(MemoryStore())
        assert memory_found == expected

    run(scenario())


def test_a_watch_answer_too_large_to_take_lists_again(etcd: EtcdServer, prefix: str) -> None:
    """A watch catching up many revisions gets them in one answer, which values of 1 MiB make larger than the
    client takes (64 MiB). Resuming would ask for it again forever; the watch lists again (paged) instead and
    carries on from there."""

    async def scenario() -> None:
        store = EtcdStore(etcd.endpoint)
        start = await store.put(f"{prefix}/before", b"0")
        for i in range(70):
            await store.put(f"{prefix}/big{i:02}", b"v" * (1 << 20))
        listings: list[Snapshot] = []

        async def listing(wanted: str) -> Snapshot:
            # The first listing is of the revision before the big values, so the watch must catch up on them.
            snapshot = Snapshot((), start) if not listings else await store.list_prefix(wanted)
            listings.append(snapshot)
            return snapshot

        restarts: list[str] = []
        watch = watcher.observe(store.connection, f"{prefix}/", listing, on_restart=restarts.append)
        assert await anext(watch) == listings[0]
        again = await asyncio.wait_for(anext(watch), timeout=30)
        assert restarts == ["too_large"]
        assert isinstance(again, Snapshot) and len(again.items) == 71
        assert sum(kv.oversize > 0 for kv in again.items) == 70
        await store.put(f"{prefix}/after", b"1")
        after = await asyncio.wait_for(anext(watch), timeout=10)
        assert isinstance(after, Events) and [e.kv.key for e in after.events] == [f"{prefix}/after"]
        await watch.aclose()
        await store.close()

    run(scenario())


def test_a_member_says_its_release_and_names_no_watch_in_its_answer_to_a_progress_request(
    shared_etcd: EtcdServer, prefix: str
) -> None:
    """What the watch guard decides how far to trust (store/watcher.py, delivered_revision): the release a member
    reports to a node's credential (that of the etcd binary under test), and the watch an answer to a progress
    request names (none: -1), decoded as the guard sees them."""

    binary = subprocess.run([find_etcd(), "--version"], capture_output=True, text=True, check=True).stdout
    root = wire_key(KeySchema(prefix).root)  # what a node may watch

    async def scenario() -> None:
        store = EtcdStore(shared_etcd.endpoint, tls=shared_etcd.authorize_node("n1", prefix=prefix))
        connection = store._connection  # the member's release is asked per connection
        conn = connection.connection()
        version = await connection.member_version(conn)
        assert version and f"etcd Version: {version}" in binary, (version, binary)
        call = conn.watch()
        try:
            create = rpc_pb2.WatchCreateRequest(key=root, range_end=prefix_range_end(root))
            await call.write(rpc_pb2.WatchRequest(create_request=create))
            created = cast(WatchAnswer, await call.read())
            assert created.created and created.watch_id == 0
            await call.write(watcher._PROGRESS_REQUEST)
            answer = cast(WatchAnswer, await asyncio.wait_for(call.read(), 10))
            assert not answer.events and not answer.created and answer.watch_id == -1, answer
            trusted = watcher.progress_answers_reliable(version)
            assert watcher.delivered_revision(answer, progress_reliable=trusted) == (answer.revision if trusted else 0)
        finally:
            call.cancel()
            await store.close()

    run(scenario())
