"""Joining the mesh at start: the mesh listed once, the config and the registration taken from that listing, and
the watch opened from it at once; each step retried while etcd cannot be reached.

The one listing has three readers. The mesh config to register with is in it. Registration judges the claims by
it (and reads those made since, as it always did), where it used to list every claim again. And it is the
observer's first batch, handed on together with the changes up to this node's own record's revision, so that no
pass ever sees the mesh without this node. The watch opens right after the listing, while registration runs:
opened after registration it would start in the past, and etcd catches such watches up only every 100 ms (mvcc's
syncWatchersLoop), which cost more than the second listing saved.

What lives on from here (the modules, the settings, the listing until it is folded in) is frozen out of the
cyclic collector's generations: beside 10,000 nodes its full collections, each walking every object the process
had, were a fifth of a cold start (docs/benchmarks.md). Frozen objects are still freed when nothing refers to
them; the listing holds no cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple, TypeVar

from warren_mesh.agent.observer import MeshObserver
from warren_mesh.agent.publication import Registration
from warren_mesh.agent.registrar import Registrar
from warren_mesh.store.base import Backoff, Store, StoreUnavailable
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import MeshConfig
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Snapshot

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Stopped(Exception):
    """The agent was told to stop while it was still starting."""


class Joined(NamedTuple):
    config: MeshConfig  # the config registered with
    registration: Registration
    observer: MeshObserver  # its watch open, its first batch the listing and the registration


async def join(
    stop: asyncio.Event,
    store: Store,
    schema: KeySchema,
    registrar: Registrar,
    observer_of: Callable[[Snapshot], MeshObserver],
) -> Joined:
    """List the mesh, open the watch from the listing (``observer_of`` makes the observer that hands it on) and
    register by it (see the module's docstring). Raises ``Stopped`` if told to stop first."""
    gc.freeze()
    listed = await until_etcd(stop, lambda: store.list_prefix(schema.root))
    gc.freeze()
    config = config_in(listed, schema)
    observer = observer_of(listed)
    observer.start()
    try:
        registration = await until_etcd(stop, lambda: registrar.register(config, listed=listed))
        published = await until_etcd(stop, lambda: store.get(registrar.publication.key))
    except BaseException:
        await observer.close()
        raise
    # Gone already (the lease ran out): the first batch says so, and the registrar writes the record again.
    observer.hold_until(published.mod_revision if published is not None else 0)
    return Joined(config, registration, observer)


def config_in(listed: Snapshot, schema: KeySchema) -> MeshConfig:
    """The mesh config to register with, as ``listed`` has it: the defaults if there is none or it is invalid.
    A config the view will refuse (one that would leave registered nodes out) is not recognised here; the operator
    never writes one, and docs/security.md says what a hostile one can do."""
    kv = next((kv for kv in listed.items if kv.key == schema.config), None)
    if kv is None:
        return MeshConfig()
    try:
        return MeshConfig.from_json(decode_json(kv.value))
    except RecordError as exc:
        log.warning("mesh config is invalid, using defaults until it is fixed: %s", exc)
        return MeshConfig()


async def until_etcd(stop: asyncio.Event, attempt: Callable[[], Awaitable[_T]]) -> _T:
    """Retry ``attempt`` while etcd is unreachable, until it succeeds or the agent is told to stop (``Stopped``)."""
    backoff = Backoff(maximum=2.0)
    warned = False
    while not stop.is_set():
        try:
            return await attempt()
        except StoreUnavailable as exc:
            if not warned:
                log.warning("waiting for etcd: %s", exc)
                warned = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backoff.delay()):
                await stop.wait()
    raise Stopped
