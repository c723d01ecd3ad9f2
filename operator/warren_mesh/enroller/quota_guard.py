"""The hard quota, enforced: a node past it loses its write permissions until an administrator restores them.

It runs in the enroller because the enroller already holds etcd's root credential (it gives every node its user
and role); nothing else of the mesh does, and only root may change roles. It follows the mesh's root with a watch,
folds each node's usage (mesh/usage.py) and suspends a node the moment it is past the hard quota
(store/roles.py ``suspend_node``). Every ``RECHECK`` s it revokes again what every suspended node still holds, which
closes the one race there is: an enrolment that granted the role between the mark and the revocation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from warren_mesh.mesh.usage import DEFAULT_QUOTA, NodeUsage, Quota
from warren_mesh.store import roles
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Events, Snapshot, WatchResult

log = logging.getLogger(__name__)

RECHECK: Final = 60.0


class QuotaGuard:
    def __init__(self, admin: EtcdStore, schema: KeySchema, quota: Quota = DEFAULT_QUOTA) -> None:
        """``admin``: a store on etcd's root credential."""
        self._auth = EtcdAuth(admin)
        self._store = admin
        self._schema = schema
        self._quota = quota
        self.usage = NodeUsage(schema)
        self.suspended: set[str] = set()  # nodes marked suspended in etcd

    async def run(self) -> None:
        rechecking = asyncio.get_running_loop().create_task(self._recheck(), name="quota-recheck")
        try:
            async for result in self._store.observe(self._schema.root):
                self.usage.apply(result)
                self._follow_marks(result)
                if isinstance(result, Snapshot):
                    log.info(
                        "quota guard: following %d node(s) under %s, %d suspended",
                        len(self.usage.by_node),
                        self._schema.root,
                        len(self.suspended),
                    )
                await self._enforce()
        finally:
            rechecking.cancel()

    async def _enforce(self) -> None:
        for node, (level, why) in self.usage.over(self._quota).items():
            if level != "hard" or node in self.suspended:
                continue
            log.warning("node %s: %s; taking its write permissions away", node, why)
            try:
                await roles.suspend_node(self._auth, self._schema, node, why)
            except StoreError as exc:
                log.warning("node %s could not be suspended yet: %s", node, exc)
                continue
            self.suspended.add(node)

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(RECHECK)
            for node in sorted(self.suspended):
                try:
                    await roles.revoke_writes(self._auth, self._schema, node)
                except StoreError as exc:
                    log.warning("node %s: revoking its write permissions again failed: %s", node, exc)

    def _follow_marks(self, result: WatchResult) -> None:
        start = self._schema.suspended
        if isinstance(result, Snapshot):
            self.suspended = {kv.key[len(start) :] for kv in result.items if kv.key.startswith(start)}
        elif isinstance(result, Events):
            for event in result.events:
                if event.kv.key.startswith(start):
                    name = event.kv.key[len(start) :]
                    if event.kind == "put":
                        self.suspended.add(name)
                    else:
                        self.suspended.discard(name)
