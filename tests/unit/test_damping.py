"""Damping (mesh/damping.py, in the view and the observe stage): a node rewriting its record many times a second
is followed at a bounded rate, the newest record winning, and nothing is lost; an honest node is never held back.
The real flood, through etcd with an attacker's credential, is tests/integration/test_node_credential.py."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import AsyncGenerator

from helpers import run
from unit.stage_parts import SCHEMA, ReadOnlyStore, publish, record
from warren_mesh.agent.observer import MeshObserver, Observed
from warren_mesh.mesh.damping import BURST, RATE, Damper
from warren_mesh.mesh.view import MeshView
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _update(node: NodeRecord, port: int, revision: int) -> Events:
    """``node``'s record rewritten with endpoint port ``port``, at ``revision``."""
    changed = dataclasses.replace(node, endpoints=(Endpoint(node.endpoint.host, port),))
    kv = KeyValue(SCHEMA.node(node.name), encode_json(changed.to_json()), 2, revision)
    return Events((Event("put", kv),), revision)


def _snapshot(*nodes: NodeRecord) -> Snapshot:
    items = tuple(KeyValue(SCHEMA.node(n.name), encode_json(n.to_json()), 2 + i, 2 + i) for i, n in enumerate(nodes))
    return Snapshot(items, 2 + len(nodes))


def test_a_flooding_node_is_applied_at_its_rate_and_its_newest_record_wins() -> None:
    clock = _Clock()
    view = MeshView(SCHEMA, damper=Damper(clock))
    flooder, honest = record("flood", 1), record("honest", 2)
    view.apply(_snapshot(flooder, honest))
    applied, held = 0, 0
    revision = 10
    for port in range(20000, 20300):  # 300 rewrites in one second
        revision += 1
        changes = view.apply(_update(flooder, port, revision))
        applied += "flood" in changes.nodes
        held += changes.damped == ("flood",)
        # A batch whose updates were all held back is nothing for a pass to decide from.
        assert changes.anything == ("flood" in changes.nodes)
        clock.now += 1 / 300
    assert applied == int(BURST + RATE * 299 / 300) and held == 300 - applied
    assert view.nodes["flood"].record.endpoint.port != 20299, "the newest is held, not applied yet"
    # An honest node's update in the middle of it all is applied at once.
    revision += 1
    assert "honest" in view.apply(_update(honest, 40000, revision)).nodes
    # The flood stops: the newest record is released when the rate allows, and nothing else is held.
    wait = view.next_release()
    assert wait is not None and 0 < wait <= 1 / RATE
    clock.now += wait
    released = view.release_held()
    assert "flood" in released.nodes and view.nodes["flood"].record.endpoint.port == 20299
    assert view.next_release() is None


def test_an_honest_burst_a_first_record_and_a_deletion_are_never_held() -> None:
    clock = _Clock()
    view = MeshView(SCHEMA, damper=Damper(clock))
    node = record("n", 1)
    view.apply(_snapshot())
    first = KeyValue(SCHEMA.node("n"), encode_json(node.to_json()), 3, 3)
    assert "n" in view.apply(Events((Event("put", first),), 3)).nodes
    # Registering, an observation, an adopted endpoint, a rotated key: a burst of BURST updates, all applied.
    for i in range(int(BURST)):
        assert "n" in view.apply(_update(node, 30000 + i, 4 + i)).nodes
    # One more at once is held; its node deleted meanwhile: the deletion goes through and nothing stays held.
    assert view.apply(_update(node, 31000, 50)).damped == ("n",)
    gone = view.apply(Events((Event("delete", KeyValue(SCHEMA.node("n"), b"", 0, 51)),), 51))
    assert "n" in gone.nodes and "n" not in view.nodes and view.next_release() is None


async def _flooded() -> tuple[MemoryStore, MeshView, AsyncGenerator[Observed, None]]:
    """An observer's store, view and batches after node ``flood`` rewrote its record 40 times at once (ports
    20000-20039), past its burst; the snapshot before it taken."""
    store = MemoryStore()
    flooder = record("flood", 1)
    await publish(store, flooder)
    view = MeshView(SCHEMA, damper=Damper())
    batches = MeshObserver(store=ReadOnlyStore(store), view=view, watched=lambda: ()).batches()
    await asyncio.wait_for(anext(batches), 5)
    for port in range(20000, 20040):
        changed = dataclasses.replace(flooder, endpoints=(Endpoint(ipaddress.ip_address("192.0.2.11"), port),))
        await store.put(SCHEMA.node("flood"), encode_json(changed.to_json()))
    return store, view, batches


def test_the_observer_releases_a_held_record_when_no_batch_comes() -> None:
    """The flood stops and the mesh is quiet: the newest record still reaches the view (and the decide stage),
    from the observer's own timer."""

    async def body() -> None:
        _, view, batches = await _flooded()
        damped = 0
        while view.nodes["flood"].record.endpoint.port != 20039:
            observed = await asyncio.wait_for(anext(batches), 5)
            damped += len(observed.changes.damped)
        assert damped > 0, "nothing was held back: the test did not flood"
        assert view.next_release() is None
        await batches.aclose()

    run(body())


def test_a_held_record_is_released_when_due_however_busy_the_stream() -> None:
    """The flood stops while other keys keep the stream busy (some answer is always arriving): the flooder's newest
    record is still folded in when it is due, not when the stream next falls quiet."""

    async def body() -> None:
        store, view, batches = await _flooded()

        async def chatter() -> None:  # keys of a newer schema: watch answers the view does not take
            i = 0
            while True:
                i += 1
                await store.put(f"{SCHEMA.root}future/{i % 3}", b"x")
                await asyncio.sleep(0.002)

        talking = asyncio.get_running_loop().create_task(chatter())
        loop = asyncio.get_running_loop()
        started, damped = loop.time(), 0
        try:
            while view.nodes["flood"].record.endpoint.port != 20039 and loop.time() - started < 5:
                observed = await asyncio.wait_for(anext(batches), 5)
                damped += len(observed.changes.damped)
        finally:
            talking.cancel()
            await batches.aclose()
        assert damped > 0, "nothing was held back: the test did not flood"
        assert view.nodes["flood"].record.endpoint.port == 20039, "the held record waited for a quiet stream"
        assert loop.time() - started < 1 / RATE + 0.5

    run(body())
