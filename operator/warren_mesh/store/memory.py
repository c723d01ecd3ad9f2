"""A store in memory that keeps etcd's promises, for fast tests of the logic above the store.

What it keeps of etcd: one revision counter for the whole keyspace, create and mod revisions per key, create-only
and compare-and-swap transactions, leases whose keys are deleted when they expire or are revoked, and watches
that resume from a revision until that revision is compacted away. What it adds for tests: time is a clock the
test drives (``advance``), and the store can be made unreachable (``available = False``), so a test decides
exactly when a lease runs out or etcd goes away. The integration tests against a real etcd stay; this store adds
tests, it replaces none.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from warren_mesh.store.base import LeaseNotFound, StoreUnavailable
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot, WatchResult


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class ManualClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """One etcd keyspace in memory; every client of a test shares one instance (as they would share etcd)."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock()
        self.revision = 1  # etcd starts at 1
        self.compacted = 0  # revisions up to this one can no longer be watched from
        self.available = True
        self._data: dict[str, KeyValue] = {}
        self._history: list[tuple[int, Event]] = []
        self._leases: dict[int, _Lease] = {}
        self._held: set[int] = set()  # leases a hold_lease() call keeps alive
        self._lease_ids = itertools.count(0x1000)
        self._changed = asyncio.Condition()

    # --- what tests drive ---------------------------------------------------------------------------------------

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: leases held by a reachable client are refreshed (as keepalives every TTL/3 would
        be), the others expire once their TTL is over (and their keys go)."""
        for _ in range(3):  # time passing lets whatever is ready run first (a keepalive just started, say)
            await asyncio.sleep(0)
        self.clock.now += seconds
        for lease_id, lease in list(self._leases.items()):
            if lease_id in self._held and self.available:
                lease.expires_at = self.clock.now + lease.ttl
            elif lease.expires_at <= self.clock.now:
                await self._drop_lease(lease_id)
        await asyncio.sleep(0)  # let watchers and holders see it

    async def compact(self, revision: int) -> None:
        self._check()
        self.compacted = max(self.compacted, revision)
        self._history = [(r, e) for r, e in self._history if r > revision]

    # --- key-values ---------------------------------------------------------------------------------------------

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("the memory store is unavailable (as the test wants)")

    async def get(self, key: str) -> KeyValue | None:
        self._check()
        return self._data.get(key)

    async def list_prefix(self, prefix: str, *, created_after: int = 0) -> Snapshot:
        self._check()
        items = tuple(
            kv
            for key, kv in sorted(self._data.items())
            if key.startswith(prefix) and kv.create_revision > created_after
        )
        return Snapshot(items, self.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        await self._write([self._put_event(key, value, lease)])
        return self.revision

    async def delete(self, key: str) -> bool:
        self._check()
        if key not in self._data:
            return False
        await self._write([self._delete_event(key)])
        return True

    async def delete_prefix(self, prefix: str) -> int:
        self._check()
        keys = [key for key in self._data if key.startswith(prefix)]
        if keys:
            await self._write([self._delete_event(key) for key in keys])
        return len(keys)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue | None:
        holders = await self.create_all([(key, value, lease)])
        return None if holders is None else holders[0]

    async def create_all(self, items: Sequence[tuple[str, bytes, int]]) -> list[KeyValue | None] | None:
        self._check()
        if any(key in self._data for key, _, _ in items):
            return [self._data.get(key) for key, _, _ in items]
        await self._write([self._put_event(key, value, lease) for key, value, lease in items])
        return None

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> KeyValue | None:
        self._check()
        current = self._data.get(key)
        if current is None or current.mod_revision != mod_revision:
            return current or KeyValue(key, b"", 0, 0)
        await self._write([self._put_event(key, value, lease)])
        return None

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        self._check()
        current = self._data.get(key)
        if current is None or current.mod_revision != mod_revision:
            return False
        await self._write([self._delete_event(key)])
        return True

    async def commit(
        self, *, unchanged: Sequence[tuple[str, int]], puts: Sequence[tuple[str, bytes]], deletes: Sequence[str]
    ) -> bool:
        self._check()
        for key, mod_revision in unchanged:
            current = self._data.get(key)
            if (current.mod_revision if current is not None else 0) != mod_revision:
                return False
        events = [self._put_event(key, value, 0) for key, value in puts]
        events += [self._delete_event(key) for key in deletes if key in self._data]
        if events:
            await self._write(events)
        return True

    def _put_event(self, key: str, value: bytes, lease: int) -> Event:
        if lease and lease not in self._leases:
            raise LeaseNotFound(f"lease {lease:x} not found")
        current = self._data.get(key)
        create = current.create_revision if current is not None else 0  # 0: filled in with the write's revision
        return Event("put", KeyValue(key, value, create, 0, lease))

    def _delete_event(self, key: str) -> Event:
        return Event("delete", KeyValue(key, b"", 0, 0))

    async def _write(self, events: list[Event]) -> None:
        """Apply ``events`` as one revision (one transaction)."""
        self.revision += 1
        for event in events:
            kv = event.kv
            previous = self._data.get(kv.key)
            if previous is not None and previous.lease in self._leases:
                self._leases[previous.lease].keys.discard(kv.key)
            if event.kind == "put":
                stored = KeyValue(kv.key, kv.value, kv.create_revision or self.revision, self.revision, kv.lease)
                self._data[kv.key] = stored
                if kv.lease:
                    self._leases[kv.lease].keys.add(kv.key)
                self._history.append((self.revision, Event("put", stored)))
            else:
                del self._data[kv.key]
                self._history.append((self.revision, Event("delete", KeyValue(kv.key, b"", 0, self.revision))))
        async with self._changed:
            self._changed.notify_all()

    # --- leases -------------------------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        self._check()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl, self.clock() + ttl)
        return lease_id

    async def hold_lease(
        self, lease_id: int, ttl: int, *, first_in: float, on_renewed: Callable[[], None] | None = None
    ) -> None:
        """Keep the lease alive (``advance`` refreshes held leases) until it is gone; raise StoreUnavailable when
        the store becomes unreachable, as a keepalive stream would fail."""
        del first_in  # refreshes follow the test's clock, not a schedule of their own
        self._check()
        if lease_id not in self._leases:
            return
        self._held.add(lease_id)
        if on_renewed is not None:
            on_renewed()
        try:
            while lease_id in self._leases:
                self._check()
                async with self._changed:
                    await self._changed.wait()
        finally:
            self._held.discard(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        self._check()
        await self._drop_lease(lease_id)

    async def lease_time_left(self, lease_id: int) -> int:
        self._check()
        lease = self._leases.get(lease_id)
        return -1 if lease is None else max(0, round(lease.expires_at - self.clock()))

    async def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None and lease.keys:
            await self._write([self._delete_event(key) for key in sorted(lease.keys) if key in self._data])
        else:
            async with self._changed:
                self._changed.notify_all()

    # --- watch --------------------------------------------------------------------------------------------------

    async def observe(
        self,
        prefix: str,
        *,
        quiet_interval: float = 5.0,
        on_restart: Callable[[str], None] | None = None,
        listed: Snapshot | None = None,
    ) -> AsyncGenerator[WatchResult, None]:
        del quiet_interval  # nothing here goes quiet without a reason
        next_revision: int | None = None
        while True:
            if not self.available:
                async with self._changed:
                    await self._changed.wait()
                continue
            if next_revision is None or next_revision <= self.compacted:
                if next_revision is not None and on_restart is not None:
                    on_restart("compacted")
                snapshot, listed = (listed if listed is not None else await self.list_prefix(prefix)), None
                next_revision = snapshot.revision + 1
                yield snapshot
                continue
            events = [e for r, e in self._history if r >= next_revision and e.kv.key.startswith(prefix)]
            if events:
                next_revision = self.revision + 1
                yield Events(tuple(events), events[-1].kv.mod_revision)
                continue
            async with self._changed:
                if self.revision < next_revision:
                    await self._changed.wait()

    def reload_tls(self) -> bool:
        return False  # no certificates in memory

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            async with self._changed:
                self._changed.notify_all()

    async def set_available(self, available: bool) -> None:
        """Make the store reachable or not; waiting watchers and holders notice at once."""
        self.available = available
        async with self._changed:
            self._changed.notify_all()
