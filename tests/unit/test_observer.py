"""The observe stage on the memory store: it folds the watch into the view and hands on what each batch changed
and said about the keys its consumers watch, and it writes nothing (its store refuses every write)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from helpers import run
from unit.stage_parts import SCHEMA, ReadOnlyStore, publish, record
from warren_mesh.agent.observer import MeshObserver, Observed
from warren_mesh.mesh.view import MeshView
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.records import MeshConfig, encode_json


async def _next(batches: AsyncGenerator[Observed, None]) -> Observed:
    return await asyncio.wait_for(anext(batches), timeout=5)


def test_the_observer_folds_batches_hands_on_their_changes_and_writes_nothing() -> None:
    async def body() -> None:
        store = MemoryStore()
        a, b = record("a", 1), record("b", 2)
        await publish(store, a)
        read_only = ReadOnlyStore(store)
        view = MeshView(SCHEMA)
        watched = [SCHEMA.node("a"), SCHEMA.key_rotation("a")]
        restarts: list[str] = []
        observer = MeshObserver(store=read_only, view=view, watched=lambda: watched, on_restart=restarts.append)
        batches = observer.batches()
        # The first batch is the snapshot: everything changed, and it says what each watched key holds.
        first = await _next(batches)
        assert first.changes.everything and first.events == 0 and view.synced
        assert set(view.nodes) == {"a"} and first.mentioned == {
            SCHEMA.node("a"): encode_json(a.to_json()),
            SCHEMA.key_rotation("a"): None,
        }
        # A join: only its record (and its claims' holders) changed; no watched key was mentioned.
        await publish(store, b)
        joined = await _next(batches)
        while "b" not in joined.changes.nodes:
            joined = await _next(batches)
        assert not joined.changes.everything and joined.changes.published == {"b": 1.0}
        assert SCHEMA.node("a") not in joined.mentioned and set(view.nodes) == {"a", "b"}
        # A rotation request for a, and a's record deleted: both said, with their values after the batch.
        await store.put(SCHEMA.key_rotation("a"), b'{"requested_at": 5}')
        asked = await _next(batches)
        assert asked.mentioned == {SCHEMA.key_rotation("a"): b'{"requested_at": 5}'}
        await store.delete(SCHEMA.node("a"))
        deleted = await _next(batches)
        assert deleted.mentioned == {SCHEMA.node("a"): None} and deleted.changes.nodes == frozenset({"a"})
        # A config change is handed on with the config in force, and a bad record as a rejection.
        config = MeshConfig(mtu=1380)
        await store.put(SCHEMA.config, encode_json(config.to_json()))
        changed = await _next(batches)
        assert changed.config == config and changed.changes.everything
        await store.put(SCHEMA.node("c"), b"{not json")
        rejected = await _next(batches)
        assert [r.reason for r in rejected.changes.rejections] == ["invalid_json"]
        await batches.aclose()
        assert read_only.writes == [] and restarts == []

    run(body())


def test_a_start_that_registered_after_listing_hands_on_the_listing_and_its_registration_as_one_batch() -> None:
    """The agent lists the mesh, registers (judging claims by that listing), then observes from the listing: the
    first batch handed on must already hold its own record and claims (a pass on the listing alone would see a
    mesh without this node), so everything up to the record's revision is folded in and handed on together."""

    async def body() -> None:
        store = MemoryStore()
        await publish(store, record("a", 1))
        listed = await store.list_prefix(SCHEMA.root)
        own = record("b", 2)
        await publish(store, own)  # the registration, after the listing
        registered = await store.get(SCHEMA.node("b"))
        assert registered is not None
        await publish(store, record("c", 3))  # someone else's, after it
        view = MeshView(SCHEMA)
        watched = [SCHEMA.node("b"), SCHEMA.claim("b", str(own.overlay_ip))]
        observer = MeshObserver(
            store=ReadOnlyStore(store),
            view=view,
            watched=lambda: watched,
            listed=listed,
        )
        observer.hold_until(registered.mod_revision)
        batches = observer.batches()
        first = await _next(batches)
        assert first.changes.everything and first.events > 0
        assert view.revision >= registered.mod_revision and {"a", "b"} <= set(view.nodes)
        assert first.mentioned == {watched[0]: encode_json(own.to_json()), watched[1]: b""}
        assert first.revisions[watched[0]] == registered.mod_revision
        while "c" not in view.nodes:
            await _next(batches)
        await batches.aclose()

    run(body())
