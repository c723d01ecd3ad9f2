"""etcd as the mesh's store (the ``Store`` of store/base.py), spoken over asyncio gRPC with the etcd3 package's
protocol definitions.

Why not etcd3's own client: its watcher is one shared thread that re-dials in a tight loop while etcd is down,
waits forever for a watch whose start revision was compacted, and has no way to notice a watch that silently
stopped. We keep its generated messages and stubs and put our own connection handling around them, one concept
per module: the connection and its failover (store/connection.py), the lease keepalive (store/leases.py), the
watch (store/watcher.py), and the wire decoding of the hot answers (store/wire.py). This module is the facade and
the key-value calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Final

from etcd3.etcdrpc import rpc_pb2

from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.store import leases, watcher
from warren_mesh.store.base import AnswerTooLarge, LeaseNotFound, StoreError, StoreUnavailable
from warren_mesh.store.connection import RANGE_ANSWER_BYTES, EtcdConnection, kv_of, prefix_range_end, wire_key
from warren_mesh.store.wire import RangeAnswer
from warren_mesh.values.watch import KeyValue, Snapshot, WatchResult

# Keys per page of a listing. Pages are bounded by bytes (RANGE_ANSWER_BYTES) first: 10,000 node records (~350
# bytes each) and their 10,000 claims (keys only) in 8 round trips; with 512 keys and 256 KiB a page an agent
# starting beside them waited on etcd 58 times (docs/benchmarks.md, cold start).
PAGE_KEYS: Final = 4096
_LIST_ATTEMPTS: Final = 3
_COMPACTED: Final = "required revision has been compacted"
_KEY_VALUE_OVERHEAD: Final = 32  # protobuf's bytes per key-value besides the key and the value: tags, revisions


def _next_limit(page: Sequence[KeyValue]) -> int:
    """Keys for the next page: as many as fill three quarters of an answer at this page's size per key."""
    per_key = _KEY_VALUE_OVERHEAD + sum(len(kv.key) + len(kv.value) + kv.oversize for kv in page) / len(page)
    return max(1, min(PAGE_KEYS, int(RANGE_ANSWER_BYTES * 0.75 / per_key)))


class EtcdStore:
    """One agent's (or the operator's) client of etcd, with failover across ``endpoints``."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        tls: EtcdTls | None = None,
        call_timeout: float = 5.0,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        """``tls``: the CA and client certificate for https endpoints (None: system CAs, no client certificate)."""
        self._connection = EtcdConnection(endpoints, tls=tls, call_timeout=call_timeout, on_health=on_health)

    @property
    def endpoint(self) -> str:
        return self._connection.endpoint

    def reload_tls(self) -> bool:
        """See ``EtcdConnection.reload_tls``."""
        return self._connection.reload_tls()

    @property
    def connection(self) -> EtcdConnection:
        """For the store's sibling modules (store/etcd_auth.py)."""
        return self._connection

    @property
    def up(self) -> bool:
        return self._connection.up

    @property
    def known_revision(self) -> int:
        """The store revision in etcd's latest lease answer to us."""
        return self._connection.known_revision

    async def close(self) -> None:
        await self._connection.close()

    # --- keys -------------------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        try:
            resp: RangeAnswer = await self._connection.call("decoded", "Range", rpc_pb2.RangeRequest(key=wire_key(key)))
        except AnswerTooLarge:
            return (await self._first_key(wire_key(key), b"", 0))[0]
        return resp.kvs[0] if resp.kvs else None

    async def list_prefix(self, prefix: str, *, created_after: int = 0) -> Snapshot:
        """Every key under ``prefix`` at one revision, read in pages that no writer can make too large for us: at
        most ``PAGE_KEYS`` keys and ``RANGE_ANSWER_BYTES`` bytes each (a page that would be larger is asked for
        again with fewer keys, down to one). A key whose value alone is over that is skipped by its key (its value
        never fetched) and listed with ``oversize`` set, for the view to reject and report; one whose value is
        over the record limit but under the page limit arrives the same way (store/wire.py drops its bytes).
        ``created_after``: only keys created after that revision (etcd filters them, and answers only those)."""
        for _ in range(_LIST_ATTEMPTS):
            try:
                return await self._list_pages(wire_key(prefix), created_after)
            except StoreError as exc:
                if _COMPACTED not in str(exc):
                    raise
                # The revision the first page pinned was compacted before the last page was read: start over.
        raise StoreUnavailable(f"{prefix} kept being compacted while it was listed; tried {_LIST_ATTEMPTS} times")

    async def _list_pages(self, raw: bytes, created_after: int) -> Snapshot:
        end = prefix_range_end(raw)
        start, revision, limit = raw, 0, PAGE_KEYS
        items: list[KeyValue] = []
        while True:
            request = rpc_pb2.RangeRequest(
                key=start,
                range_end=end,
                limit=limit,
                revision=revision,
                min_create_revision=created_after + 1 if created_after else 0,
            )
            try:
                page: RangeAnswer = await self._connection.call("decoded", "Range", request)
            except AnswerTooLarge:
                if limit > 1:
                    limit = max(1, limit // 4)
                    continue
                skipped, revision = await self._first_key(start, end, revision)
                if skipped is None:  # gone at this revision: cannot be, it was just too large to send
                    raise StoreUnavailable(f"etcd's answers for keys from {start[:64]!r} do not agree") from None
                items.append(skipped)
                start = wire_key(skipped.key) + b"\0"
                continue
            revision = revision or page.revision
            items.extend(page.kvs)
            if not page.more or not page.kvs:
                return Snapshot(tuple(items), revision)
            start = wire_key(page.kvs[-1].key) + b"\0"
            limit = _next_limit(page.kvs)

    async def _first_key(self, start: bytes, end: bytes, revision: int) -> tuple[KeyValue | None, int]:
        """The first key in ``[start, end)`` at ``revision`` (0: now) without its value, marked as over the
        answer limit, and the revision read. In a transaction: Txn answers are not held to the Range limit, and
        the key itself may be up to etcd's request limit."""
        ranged = rpc_pb2.RangeRequest(key=start, range_end=end, limit=1, keys_only=True, revision=revision)
        request = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_range=ranged)])
        resp = await self._connection.call("kv", "Txn", request)
        kvs = resp.responses[0].response_range.kvs
        revision = revision or int(resp.header.revision)
        if not kvs:
            return None, revision
        return dataclasses.replace(kv_of(kvs[0]), oversize=RANGE_ANSWER_BYTES), revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        resp = await self._connection.call("kv", "Put", rpc_pb2.PutRequest(key=wire_key(key), value=value, lease=lease))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        resp = await self._connection.call("kv", "DeleteRange", rpc_pb2.DeleteRangeRequest(key=wire_key(key)))
        return bool(resp.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` in one revision; returns how many there were."""
        raw = wire_key(prefix)
        request = rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw))
        resp = await self._connection.call("kv", "DeleteRange", request)
        return int(resp.deleted)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it does not exist. Returns None on success, else the record that is there."""
        holders = await self.create_all([(key, value, lease)])
        if holders is None:
            return None
        # Nothing there means the key vanished between compare and range: report it as a bare conflict.
        return holders[0] or KeyValue(key, b"", 0, 0)

    async def create_all(self, items: Sequence[tuple[str, bytes, int]]) -> list[KeyValue | None] | None:
        """Put every ``(key, value, lease)`` in one revision, only if none of the keys exists. None on success,
        else what is at each key (None where nothing is)."""
        compares = [
            rpc_pb2.Compare(
                result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=wire_key(k), create_revision=0
            )
            for k, _, _ in items
        ]
        puts = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=wire_key(k), value=v, lease=lease))
            for k, v, lease in items
        ]
        ranges = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=wire_key(k))) for k, _, _ in items]
        request = rpc_pb2.TxnRequest(compare=compares, success=puts, failure=ranges)
        resp = await self._connection.call("kv", "Txn", request)
        if resp.succeeded:
            return None
        return [kv_of(r.response_range.kvs[0]) if r.response_range.kvs else None for r in resp.responses]

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it is unchanged since ``mod_revision``. None on success, else what is there."""
        compare = rpc_pb2.Compare(
            result=rpc_pb2.Compare.EQUAL,
            target=rpc_pb2.Compare.MOD,
            key=wire_key(key),
            mod_revision=mod_revision,
        )
        return await self._txn(compare, key, value, lease)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete ``key`` only if it is unchanged since ``mod_revision``."""
        compare = rpc_pb2.Compare(
            result=rpc_pb2.Compare.EQUAL,
            target=rpc_pb2.Compare.MOD,
            key=wire_key(key),
            mod_revision=mod_revision,
        )
        request = rpc_pb2.TxnRequest(
            compare=[compare],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=wire_key(key)))],
        )
        resp = await self._connection.call("kv", "Txn", request)
        return bool(resp.succeeded)

    async def commit(
        self, *, unchanged: Sequence[tuple[str, int]], puts: Sequence[tuple[str, bytes]], deletes: Sequence[str]
    ) -> bool:
        """See ``Store.commit``."""
        compares = [
            rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD, key=wire_key(k), mod_revision=m)
            for k, m in unchanged
        ]
        ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=wire_key(k), value=v)) for k, v in puts]
        ops += [rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=wire_key(k))) for k in deletes]
        resp = await self._connection.call("kv", "Txn", rpc_pb2.TxnRequest(compare=compares, success=ops))
        return bool(resp.succeeded)

    async def _txn(self, compare: Any, key: str, value: bytes, lease: int) -> KeyValue | None:
        request = rpc_pb2.TxnRequest(
            compare=[compare],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=wire_key(key), value=value, lease=lease))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=wire_key(key)))],
        )
        resp = await self._connection.call("kv", "Txn", request)
        if resp.succeeded:
            return None
        kvs = resp.responses[0].response_range.kvs
        # An empty answer means the key vanished between compare and range: report it as a bare conflict.
        return kv_of(kvs[0]) if kvs else KeyValue(key, b"", 0, 0)

    async def compact(self, revision: int) -> None:
        await self._connection.call("kv", "Compact", rpc_pb2.CompactionRequest(revision=revision, physical=True))

    # --- leases -----------------------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._connection.call("lease", "LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise StoreError(f"etcd refused a lease of {ttl} s: {resp.error}")
        return int(resp.ID)

    async def hold_lease(
        self, lease_id: int, ttl: int, *, first_in: float, on_renewed: Callable[[], None] | None = None
    ) -> None:
        """See ``store.leases.hold_lease``."""
        await leases.hold_lease(self._connection, lease_id, ttl, first_in=first_in, on_renewed=on_renewed)

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseNotFound):  # gone already: what revoking wanted
            await self._connection.call("lease", "LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=lease_id))

    async def lease_time_left(self, lease_id: int) -> int:
        """Seconds left on a lease; -1 when it has expired or never existed."""
        resp = await self._connection.call("lease", "LeaseTimeToLive", rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id))
        return int(resp.TTL)

    # --- watch ------------------------------------------------------------------------------------------------

    def observe(
        self,
        prefix: str,
        *,
        quiet_interval: float = 5.0,
        on_restart: Callable[[str], None] | None = None,
        listed: Snapshot | None = None,
    ) -> AsyncGenerator[WatchResult, None]:
        """See ``store.watcher.observe``."""
        return watcher.observe(
            self._connection,
            prefix,
            self.list_prefix,
            quiet_interval=quiet_interval,
            on_restart=on_restart,
            listed=listed,
        )
