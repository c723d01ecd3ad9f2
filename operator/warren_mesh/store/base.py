"""What the mesh needs of a store, as a Protocol; the errors every store raises; the pacing callers share.

``EtcdStore`` (store/etcd.py) is the real one; ``MemoryStore`` (store/memory.py) keeps the same promises in
memory for fast tests of the logic above it. Only the wiring (the agent's, the operator's and the CLI's start-up)
names a concrete store: everything else takes a ``Store``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from warren_mesh.values.watch import KeyValue, Snapshot, WatchResult


class Store(Protocol):
    """Key-values with revisions, create-only and compare-and-swap transactions, leases, and list + watch."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def list_prefix(self, prefix: str, *, created_after: int = 0) -> Snapshot:
        """Every key under ``prefix`` (only those created after revision ``created_after``, when given) and the
        store's revision at that moment."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` in one revision; returns how many there were."""
        ...

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it does not exist. None on success, else the record that is there."""
        ...

    async def create_all(self, items: Sequence[tuple[str, bytes, int]]) -> list[KeyValue | None] | None:
        """Put every ``(key, value, lease)`` in one revision, only if none of the keys exists. None on success,
        else what is at each key (None where nothing is)."""
        ...

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it is unchanged since ``mod_revision``. None on success, else what is there."""
        ...

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete ``key`` only if it is unchanged since ``mod_revision``."""
        ...

    async def commit(
        self, *, unchanged: Sequence[tuple[str, int]], puts: Sequence[tuple[str, bytes]], deletes: Sequence[str]
    ) -> bool:
        """If every ``(key, mod_revision)`` of ``unchanged`` still holds (0: the key is absent), apply ``puts``
        and ``deletes`` in one revision. Whether it did."""
        ...

    async def grant_lease(self, ttl: int) -> int: ...

    async def hold_lease(
        self, lease_id: int, ttl: int, *, first_in: float, on_renewed: Callable[[], None] | None = None
    ) -> None:
        """Keep a lease alive until the store says it is gone, then return; raise StoreUnavailable when the store
        cannot be reached (the caller holds it again)."""
        ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def lease_time_left(self, lease_id: int) -> int:
        """Seconds left on a lease; -1 when it has expired or never existed."""
        ...

    def observe(
        self,
        prefix: str,
        *,
        quiet_interval: float = 5.0,
        on_restart: Callable[[str], None] | None = None,
        listed: Snapshot | None = None,
    ) -> AsyncGenerator[WatchResult, None]:
        """A snapshot of ``prefix``, then its changes, forever, never skipping a revision; a new snapshot only
        when the history a resume needed is gone. ``on_restart`` is told why the watch started again.
        ``listed``: a snapshot of ``prefix`` the caller has listed already, handed on first instead of a new one
        (its changes since follow)."""
        ...

    def reload_tls(self) -> bool:
        """Use the client certificate on disk if it was renewed; whether it was (False where there is none)."""
        ...

    async def close(self) -> None: ...


class StoreError(RuntimeError):
    """The store refused a request for a reason retrying will not fix."""


class StoreUnavailable(StoreError):
    """The store could not be reached (or did not answer in time); retrying later may work."""


class LeaseNotFound(StoreError):
    """The lease named in a request has expired (or was revoked)."""


class AnswerTooLarge(StoreError):
    """The answer was larger than this client takes in one message (store/connection.py): ask for less."""


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter, so a fleet of agents does not reconnect in lockstep."""

    initial: float = 0.1
    maximum: float = 5.0
    _next: float = field(default=0.0, init=False)

    def delay(self) -> float:
        self._next = self.initial if self._next == 0.0 else min(self._next * 2, self.maximum)
        return random.uniform(self._next / 2, self._next)

    def reset(self) -> None:
        self._next = 0.0


def lease_refresh_interval(ttl: int) -> float:
    """A third of the TTL on average, give or take a tenth of that at random: agents started together (a cluster
    boot) would otherwise refresh in lockstep forever, and every pulse delays whatever etcd does at that moment.
    The mean is exactly TTL / 3, so a settled mesh of N costs etcd N / (TTL / 3) keepalives a second (measured by
    hack/bench.py --scenario idle); the longest gap, 0.37 TTL, still leaves two refreshes before the lease ends."""
    return ttl / 3 * random.uniform(0.9, 1.1)
