"""What the agent-stage unit tests share: a mesh of honest nodes written into a MemoryStore as agents write them
(each record with its claims), and a store that refuses every write."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import NoReturn

from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot, WatchResult

SCHEMA = KeySchema("/stage")
LOCAL_KEY = NodeKey.generate()
LOCAL = LocalNode("local", LOCAL_KEY.public_key, (ipaddress.ip_address("10.96.0.1"),))


def record(name: str, index: int, key: str | None = None) -> NodeRecord:
    """Node ``name``: overlay address 10.96.0.<10+index>, pod subnet 10.244.<index>.0/24."""
    return NodeRecord(
        name=name,
        public_key=key or NodeKey.generate().public_key,
        endpoints=(Endpoint(ipaddress.ip_address(f"192.0.2.{10 + index}"), 51820),),
        overlay_ips=(ipaddress.ip_address(f"10.96.0.{10 + index}"),),
        listen_port=51820,
        allowed_ips=(ipaddress.ip_network(f"10.244.{index}.0/24"),),
        published_at=1.0,
    )


async def publish(store: MemoryStore, node: NodeRecord) -> None:
    """Write ``node``'s claims and record as its agent does (claims first, the record on no lease)."""
    await store.create(SCHEMA.claim(node.name, str(node.overlay_ip)), b"")
    for subnet in node.allowed_ips:
        await store.create(SCHEMA.claim(node.name, str(subnet), "pods"), b"")
    await store.put(SCHEMA.node(node.name), encode_json(node.to_json()))


class WriteRefused(AssertionError):
    """Something wrote to a store that a read-only part was given."""


class ReadOnlyStore:
    """A store whose reads and watch are a MemoryStore's, and whose every write fails the test (and is counted)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.writes: list[str] = []

    def _refuse(self, what: str) -> NoReturn:
        self.writes.append(what)
        raise WriteRefused(f"{what} on a store given to a read-only part")

    async def get(self, key: str) -> KeyValue | None:
        return await self._store.get(key)

    async def list_prefix(self, prefix: str, *, created_after: int = 0) -> Snapshot:
        return await self._store.list_prefix(prefix, created_after=created_after)

    def observe(
        self,
        prefix: str,
        *,
        quiet_interval: float = 5.0,
        on_restart: Callable[[str], None] | None = None,
        listed: Snapshot | None = None,
    ) -> AsyncGenerator[WatchResult, None]:
        return self._store.observe(prefix, quiet_interval=quiet_interval, on_restart=on_restart, listed=listed)

    async def lease_time_left(self, lease_id: int) -> int:
        return await self._store.lease_time_left(lease_id)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._refuse("put")

    async def delete(self, key: str) -> bool:
        self._refuse("delete")

    async def delete_prefix(self, prefix: str) -> int:
        self._refuse("delete_prefix")

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue | None:
        self._refuse("create")

    async def create_all(self, items: Sequence[tuple[str, bytes, int]]) -> list[KeyValue | None] | None:
        self._refuse("create_all")

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> KeyValue | None:
        self._refuse("replace")

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        self._refuse("delete_if")

    async def commit(
        self, *, unchanged: Sequence[tuple[str, int]], puts: Sequence[tuple[str, bytes]], deletes: Sequence[str]
    ) -> bool:
        self._refuse("commit")

    async def grant_lease(self, ttl: int) -> int:
        self._refuse("grant_lease")

    async def hold_lease(
        self, lease_id: int, ttl: int, *, first_in: float, on_renewed: Callable[[], None] | None = None
    ) -> None:
        self._refuse("hold_lease")

    async def revoke_lease(self, lease_id: int) -> None:
        self._refuse("revoke_lease")

    def reload_tls(self) -> bool:
        return False

    async def close(self) -> None:
        pass


def names(records: Sequence[NodeRecord]) -> set[str]:
    return {r.name for r in records}
