"""Observe: the watch stream folded into the mesh view, one batch at a time, in revision order. Read only.

The observer owns the view (nothing else changes it) and writes nothing anywhere: for each batch it hands on a
value saying what changed (``Observed``) and what the batch said about the keys its consumers watch (this node's
record and claims, which the registrar keeps as they should be; a key rotation request).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple

from warren_mesh.mesh.changes import ChangeLog, Changes
from warren_mesh.mesh.usage import DEFAULT_QUOTA, Level, NodeUsage
from warren_mesh.mesh.view import MeshView
from warren_mesh.store.base import Store
from warren_mesh.store.read_ahead import ReadAhead
from warren_mesh.trust.records import MeshConfig
from warren_mesh.values.watch import Events, Snapshot, WatchResult


class Observed(NamedTuple):
    """One watch batch, folded in."""

    # A NamedTuple, not a frozen dataclass: made once per watch batch or pass on every agent, and a tuple is built
    # in C (a frozen dataclass sets each field through object.__setattr__).

    changes: Changes
    events: int  # watch events in the batch (0 for a snapshot)
    config: MeshConfig  # the mesh config in force after it
    # Each watched key the batch told something about -> its value afterwards (None: deleted or absent), and the
    # revision that value is of (for a deletion or an absence, the batch's): a writer can tell its own older
    # writes from someone else's newer ones.
    mentioned: Mapping[str, bytes | None]
    revisions: Mapping[str, int]
    # This node's claims that take nothing (it holds an older one of their kind), written by someone with its
    # credential, for its owner to remove; looked up when the batch touched claims or rejected a record (a surplus
    # claim is rejected), else empty.
    surplus: tuple[str, ...] = ()
    # The nodes whose keys the batch changed -> the quota limit each is past and why (None: within its quota).
    quota: Mapping[str, tuple[Level, str] | None] = {}


class MeshObserver:
    def __init__(
        self,
        *,
        store: Store,
        view: MeshView,
        watched: Callable[[], Iterable[str]],
        owner: str | None = None,
        on_restart: Callable[[str], None] | None = None,
        listed: Snapshot | None = None,
    ) -> None:
        """``watched``: the keys whose values the consumers want to hear about (asked again for every batch);
        ``owner``: the node whose surplus claims each batch names; ``listed``: the mesh as the caller listed it,
        the first batch (its changes since follow)."""
        self._owner = owner
        self._store = store
        self._view = view
        self._watched = watched
        self._on_restart = on_restart
        self._listed = listed
        self._settled_at = 0
        self._ahead: ReadAhead | None = None

    def start(self) -> None:
        """Open the watch now and read it ahead until ``batches`` takes what came (which starts it otherwise). A
        watch opened right after its listing starts at etcd's current revision; one opened later starts in the
        past, and etcd catches such watches up every 100 ms (mvcc's syncWatchersLoop): an agent that listed, then
        registered, then opened its watch waited that long for its first batch."""
        if self._ahead is None:
            stream = self._store.observe(self._view.schema.root, on_restart=self._on_restart, listed=self._listed)
            self._listed = None  # the stream hands it on; the view will hold what it says
            self._ahead = ReadAhead(stream)
            self._ahead.start()

    def hold_until(self, revision: int) -> None:
        """Hand nothing on until the view has folded in ``revision``; what came before it goes on as one batch
        (an agent registers after listing the mesh: its consumers must never see the mesh without its record
        and claims)."""
        self._settled_at = revision

    async def close(self) -> None:
        """Stop reading the watch (``batches`` does when it ends)."""
        if self._ahead is not None:
            await self._ahead.stop()

    async def batches(self) -> AsyncGenerator[Observed, None]:
        """Forever (the watch resumes by itself after any failure of etcd's). Between watch batches, node records
        the view held back (a node rewriting its record past its rate: mesh/damping.py) are folded in when they are
        due, each such release handed on like a batch."""
        view = self._view
        usage = NodeUsage(view.schema)
        self.start()
        ahead = self._ahead
        assert ahead is not None
        early: list[Observed] = []  # folded in before the view reached ``hold_until``'s revision
        # Answers that arrived while a batch was being folded and handed on are folded next, as one batch.
        try:
            while True:
                release = view.next_release() if not early else None
                if release is not None and release <= 0:  # due, however busy the stream is
                    yield self._observed(view.release_held())
                    continue
                results = await ahead.take(timeout=release)
                if results is None:  # a held record came due before anything arrived
                    yield self._observed(view.release_held())
                    continue
                for result in results:
                    observed = self._fold(result, usage)
                    if view.revision < self._settled_at:
                        early.append(observed)
                    elif early:
                        yield self._joined([*early, observed])
                        early = []
                    else:
                        yield observed
        finally:
            await self.close()

    def _fold(self, result: WatchResult, usage: NodeUsage) -> Observed:
        view = self._view
        mentioned, revisions = _values_after(result, self._watched())
        first = not view.synced
        if first:
            # The whole mesh as listed, folded in: tens of thousands of objects that live as long as the agent, and
            # the cyclic collector would walk them again and again while they are made (collections of every
            # generation; beside 10,000 nodes ~50 ms of a cold start). Paused for this one synchronous fold.
            gc.disable()
        try:
            changes = view.apply(result)
        finally:
            if first:
                if view.synced:
                    # Everything so far (modules, metrics, the mesh) lives as long as the agent: out of the
                    # collector's generations, whose full collections would otherwise walk it again and again
                    # (pauses of tens of ms at a thousand peers, the tail of convergence lag).
                    gc.freeze()
                gc.enable()
        events = len(result.events) if isinstance(result, Events) else 0
        quota = usage.verdicts(usage.apply(result), DEFAULT_QUOTA)
        return self._observed(changes, events, mentioned, revisions, quota)

    def _joined(self, batches: list[Observed]) -> Observed:
        """Batches folded in one after another, as one (the view as the last left it)."""
        log = ChangeLog()
        mentioned: dict[str, bytes | None] = {}
        revisions: dict[str, int] = {}
        quota: dict[str, tuple[Level, str] | None] = {}
        for batch in batches:
            log.add(batch.changes)
            mentioned.update(batch.mentioned)
            revisions.update(batch.revisions)
            quota.update(batch.quota)
        # The log starts at everything (nothing seen before), as a first batch is.
        return self._observed(log.take(), sum(b.events for b in batches), mentioned, revisions, quota)

    def _observed(
        self,
        changes: Changes,
        events: int = 0,
        mentioned: Mapping[str, bytes | None] = MappingProxyType({}),
        revisions: Mapping[str, int] = MappingProxyType({}),
        quota: Mapping[str, tuple[Level, str] | None] = MappingProxyType({}),
    ) -> Observed:
        view = self._view
        surplus: tuple[str, ...] = ()
        if self._owner is not None and (changes.everything or changes.addresses or changes.rejections):
            surplus = tuple(view.surplus_claims(self._owner))
        return Observed(changes, events, view.config, mentioned, revisions, surplus, quota)


def _values_after(result: WatchResult, keys: Iterable[str]) -> tuple[dict[str, bytes | None], dict[str, int]]:
    """Each of ``keys`` that ``result`` tells anything about, with its value afterwards (None: deleted or absent)
    and that value's revision. One pass over the batch, however many keys are watched (a snapshot tells about
    every key)."""
    watched = set(keys)
    if isinstance(result, Snapshot):
        told: dict[str, bytes | None] = dict.fromkeys(watched)
        revisions = dict.fromkeys(watched, result.revision)
        for kv in result.items:
            if kv.key in watched:
                told[kv.key], revisions[kv.key] = kv.value, kv.mod_revision
        return told, revisions
    told, revisions = {}, {}
    for event in result.events:
        if event.kv.key in watched:
            put = event.kind == "put"
            told[event.kv.key] = event.kv.value if put else None
            revisions[event.kv.key] = event.kv.mod_revision if put else result.revision
    return told, revisions
