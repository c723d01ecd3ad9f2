"""The lease this node's record lives on: kept alive every TTL/3 from the moment it is granted until etcd drops
it, the node moves onto another, or the agent stops (revoking it, or handing the record over to the next run)."""

from __future__ import annotations

import asyncio
import logging

from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.store.base import Backoff, Store, StoreError, StoreUnavailable, lease_refresh_interval

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: Store, metrics: AgentMetrics) -> None:
        self._store = store
        self._metrics = metrics
        self._holder: asyncio.Task[None] | None = None  # keeps the current lease alive; ends when etcd drops it

    async def grant(self, ttl: int) -> tuple[int, asyncio.Task[None]]:
        """A new lease, held from this moment, not from when the record is written: with a thousand nodes
        starting at once, registering took several seconds, and a lease refreshed only after that expired before
        its first refresh. The holder is ours to ``adopt`` or cancel."""
        lease_id = await self._store.grant_lease(ttl)
        holder = asyncio.get_running_loop().create_task(self._hold(lease_id, ttl), name=f"lease-{lease_id:x}")
        return lease_id, holder

    def adopt(self, holder: asyncio.Task[None]) -> None:
        """``holder``'s lease is the current one (the previous one's holder stops: etcd dropped it, or we moved)."""
        if self._holder is not None:
            self._holder.cancel()
        self._holder = holder

    async def lost(self) -> None:
        """Return once etcd has dropped the current lease. Shielded: this waiter being cancelled (the agent
        stopping) must not stop the refreshes before the lease is revoked; ``release`` (or the next ``adopt``)
        ends the holder."""
        if self._holder is None:
            raise RuntimeError("no lease is held (register first)")
        await asyncio.shield(self._holder)

    def release(self) -> None:
        """Stop refreshing the current lease."""
        if self._holder is not None:
            self._holder.cancel()
            self._holder = None

    async def hand_over(self, key: str, lease_id: int, grace: int) -> None:
        """Leave the record at ``key`` to the agent that replaces this one: it moves from ``lease_id`` onto a lease
        of ``grace`` seconds that nobody renews, so peers keep this node (and its traffic flows) while the next run
        starts, which takes the record over without a gap. If no run comes, the record expires after ``grace``."""
        self.release()
        grace_lease = await self._store.grant_lease(grace)
        existing = await self._store.get(key)
        conflict = existing
        if existing is not None and existing.lease == lease_id:
            conflict = await self._store.replace(
                key, existing.value, mod_revision=existing.mod_revision, lease=grace_lease
            )
        if conflict is None:
            log.info("%s stays in the mesh for %d s for the agent that replaces this one", key, grace)
        else:  # not ours to hand over any more (taken over, or gone): leave as deregister would
            await self.revoke_quietly(grace_lease)
        await self.revoke_quietly(lease_id)

    async def revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._store.revoke_lease(lease_id)
        except StoreUnavailable as exc:
            log.warning("could not revoke lease %x (%s); it expires on its own", lease_id, exc)

    async def _hold(self, lease_id: int, ttl: int) -> None:
        """Refresh a lease every TTL/3 until etcd says it is gone; stream failures are retried, never fatal."""
        backoff = Backoff(initial=0.2, maximum=1.0)
        first_in = lease_refresh_interval(ttl)  # it was granted just now
        while True:
            try:
                await self._store.hold_lease(lease_id, ttl, first_in=first_in, on_renewed=backoff.reset)
                return
            except StoreError as exc:
                # Unreachable, stuck, or refused: all are retried (an agent that stops renewing leaves the mesh).
                self._metrics.lease_keepalive_failures.inc()
                log.warning("lease keepalive failed: %s", exc)
                # Renew as soon as a stream is back rather than in TTL/3: every second unrenewed is a second off
                # our peers' patience.
                first_in = 0.0
                await asyncio.sleep(backoff.delay())
