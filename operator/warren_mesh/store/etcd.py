"""etcd as the mesh's store, spoken over asyncio gRPC with the etcd3 package's protocol definitions.

Why not etcd3's own client: its watcher is one shared thread that re-dials in a tight loop while etcd is down,
waits forever for a watch whose start revision was compacted, and has no way to notice a watch that silently
stopped. We keep its generated messages and stubs and put our own connection handling around them:

- every call has a deadline; an unreachable endpoint moves us to the next one (``--etcd-endpoints``);
- ``observe()`` lists, then watches from the listed revision + 1, resumes after errors from the last revision
  it delivered, turns a compaction into a fresh snapshot, and asks etcd for a progress report when the stream
  has been quiet: a watch that answers nothing is torn down and resumed, so a stalled stream never goes unseen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

# etcd3 0.12's generated modules predate protobuf 4, which refuses them unless the pure-Python implementation is
# selected before protobuf is first imported. pyproject pins protobuf<4; this keeps a newer protobuf working too.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# gRPC's fork handlers restart its poller in a forked child; a child about to exec (the agent starting
# wireguard-go, the lab starting agents) then had that poller hit the descriptors subprocess closes, and about one
# fork in fifteen died of SIGSEGV before exec while a call was in flight. Nothing of ours uses gRPC across a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc

from warren_mesh.store.base import Backoff, LeaseNotFound, StoreError, StoreUnavailable, lease_refresh_interval
from warren_mesh.store.wire import RangeAnswer, WatchAnswer, decode_range_response, decode_watch_response
from warren_mesh.watch import Events, KeyValue, Snapshot, WatchResult

log = logging.getLogger(__name__)

_RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# How a streaming call's read, write or half-close fails once etcd or the deadline has ended it: with its status,
# or, when the call ended between our check and gRPC's, with an error of gRPC's own (ExecuteBatchError) or
# asyncio's (InvalidStateError). All mean the same to us: this call is over, retry on a new one.
_STREAM_FAILURES: Final = (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError)
# WatchRequest field 3 is WatchProgressRequest (etcd >= 3.4), an empty message etcd3 0.12's protos do not know.
# Encoded by hand: field 3, wire type 2 (length-delimited), length 0.
_PROGRESS_REQUEST: Final = b"\x1a\x00"
# A watch this many revisions behind a revision etcd has already reported is resumed on a new stream. A watcher
# that starts behind is caught up by etcd in batches (up to 1000 revisions per answer), whereas one that fell
# behind reading keeps receiving one answer per revision, already queued for it, and each answer costs a trip
# through gRPC and the event loop. With a thousand agents starting at once, the agents that registered first
# spent half the storm reading such queues one revision at a time.
CATCH_UP_GAP: Final = 500
_CHANNEL_OPTIONS: Final = (
    # Notice a dead TCP connection (etcd host gone) within ~15 s. Only while a call is open (an agent always has
    # its watch): etcd does not permit pings on a connection without streams and counts each one as a strike,
    # answering the third with GOAWAY "too_many_pings", which drops every call on the connection.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # No bandwidth-probe pings: gRPC sends them while a watch streams much data, and etcd (grpc-go, 5 s minimum
    # ping interval by default) answers a burst of them with GOAWAY "too_many_pings", dropping every call on the
    # connection. Seen with a thousand agents starting at once.
    ("grpc.http2.bdp_probe", 0),
    # Reconnect quickly after an etcd restart instead of gRPC's default of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Connections of our own: by default gRPC shares subchannels between channels of one process, so a new store
    # would inherit another's reconnect backoff (and fail at once, right after etcd came back), and simulated
    # agents in one process would share one connection instead of having their own as real agents do.
    ("grpc.use_local_subchannel_pool", 1),
)


class RevisionCompacted(StoreError):
    """The revision a watch wanted to resume from is gone; the consumer needs a fresh snapshot."""


class WatchStalled(StoreUnavailable):
    """The watch stream stopped answering, even to a progress request."""


class WatchBehind(StoreError):
    """The watch fell far behind what etcd holds; resumed on a new stream, it catches up in batches."""


@dataclass(frozen=True, slots=True)
class EtcdEndpoint:
    target: str  # host:port for gRPC
    secure: bool

    @property
    def host(self) -> str:
        """The host name or address alone (IPv6 without brackets)."""
        return self.target.rsplit(":", 1)[0].strip("[]")

    @classmethod
    def parse(cls, url: str) -> EtcdEndpoint:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"etcd endpoint {url!r} is not of the form http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {url!r} has an invalid port") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return cls(f"{host}:{port}", parts.scheme == "https")


def parse_endpoints(text: str | Sequence[str]) -> tuple[EtcdEndpoint, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    endpoints = tuple(EtcdEndpoint.parse(item) for item in items if item.strip())
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range convention)."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class _Connection:
    def __init__(self, endpoint: EtcdEndpoint) -> None:
        self.endpoint = endpoint
        if endpoint.secure:
            self.channel = grpc.aio.secure_channel(
                endpoint.target, grpc.ssl_channel_credentials(), options=_CHANNEL_OPTIONS
            )
        else:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        # Our own handles on Watch and Range, the hot path: answers are decoded by store.wire straight into our
        # values; the request serializer also passes pre-encoded bytes through.
        self.watch = self.channel.stream_stream(
            "/etcdserverpb.Watch/Watch",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=decode_watch_response,
        )
        self.decoded = _DecodedKV(
            self.channel.unary_unary(
                "/etcdserverpb.KV/Range",
                request_serializer=rpc_pb2.RangeRequest.SerializeToString,
                response_deserializer=decode_range_response,
            )
        )


@dataclass(frozen=True, slots=True)
class _DecodedKV:
    """KV methods whose answers store.wire decodes (called like the generated stub's)."""

    Range: Any  # named as etcd's method, so _call reaches it as it reaches the generated stubs' methods


def _wire_key(key: str) -> bytes:
    """A key as etcd stores it: the exact inverse of how keys are decoded (store.wire), so that a key that is not
    UTF-8 can be read, reported and deleted like any other."""
    return key.encode("utf-8", "surrogateescape")


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8", "surrogateescape"),  # as store.wire decodes keys
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        lease=raw.lease,
    )


class EtcdStore:
    """One agent's (or the operator's) connection to etcd, with failover across ``endpoints``."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        call_timeout: float = 5.0,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self._index = 0
        self._conn: _Connection | None = None
        self._call_timeout = call_timeout
        self._on_health = on_health
        self._closing: set[asyncio.Task[None]] = set()
        self.up = False
        self.known_revision = 0  # the store revision in etcd's latest lease answer to us

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._index].target

    def _connection(self) -> _Connection:
        if self._conn is None:
            self._conn = _Connection(self._endpoints[self._index])
        return self._conn

    def _set_health(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            if self._on_health is not None:
                self._on_health(up)

    def _fail_over(self, conn: _Connection, error: BaseException) -> None:
        """Mark etcd down; with several endpoints, drop ``conn`` and move to the next (unless another caller did)."""
        self._set_health(False)
        if len(self._endpoints) == 1:
            # Nowhere else to go. gRPC re-dials a broken channel by itself (within max_reconnect_backoff), and a
            # timeout under load is no broken connection: dropping it would cut the watch and every call on it,
            # and the resumed watch would cost etcd a replay (a cascade seen with a thousand agents at once).
            return
        if self._conn is not conn:
            return
        self._conn = None
        self._index = (self._index + 1) % len(self._endpoints)
        log.warning("etcd at %s failed (%s); trying %s next", conn.endpoint.target, error, self.endpoint)
        task = asyncio.get_running_loop().create_task(conn.channel.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _call(self, stub: str, method: str, request: Any) -> Any:
        conn = self._connection()
        try:
            response = await getattr(getattr(conn, stub), method)(request, timeout=self._call_timeout)
        except asyncio.CancelledError:
            if not _cut_off_by_grpc():
                raise
            raise StoreUnavailable(f"{method} on etcd at {conn.endpoint.target} was cut off (failover)") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _RETRYABLE:
                self._fail_over(conn, exc)
                raise StoreUnavailable(
                    f"etcd at {conn.endpoint.target} is unavailable: {exc.code().name}: {exc.details()}"
                ) from None
            message = f"etcd refused {method}: {exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in (exc.details() or ""):
                raise LeaseNotFound(message) from None
            raise StoreError(message) from None
        if response is None:  # gRPC hands back None when our decoder refused the answer (and logs why)
            raise StoreUnavailable(f"etcd at {conn.endpoint.target} sent an answer to {method} that does not decode")
        self._set_health(True)
        return response

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.channel.close(grace=None)
            self._conn = None
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    # --- keys -------------------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        resp: RangeAnswer = await self._call("decoded", "Range", rpc_pb2.RangeRequest(key=_wire_key(key)))
        return resp.kvs[0] if resp.kvs else None

    async def list_prefix(self, prefix: str) -> Snapshot:
        raw = _wire_key(prefix)
        request = rpc_pb2.RangeRequest(key=raw, range_end=prefix_range_end(raw))
        resp: RangeAnswer = await self._call("decoded", "Range", request)
        return Snapshot(resp.kvs, resp.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        resp = await self._call("kv", "Put", rpc_pb2.PutRequest(key=_wire_key(key), value=value, lease=lease))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        resp = await self._call("kv", "DeleteRange", rpc_pb2.DeleteRangeRequest(key=_wire_key(key)))
        return bool(resp.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` in one revision; returns how many there were."""
        raw = _wire_key(prefix)
        request = rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw))
        resp = await self._call("kv", "DeleteRange", request)
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
                result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=_wire_key(k), create_revision=0
            )
            for k, _, _ in items
        ]
        puts = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=_wire_key(k), value=v, lease=lease))
            for k, v, lease in items
        ]
        ranges = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=_wire_key(k))) for k, _, _ in items]
        resp = await self._call("kv", "Txn", rpc_pb2.TxnRequest(compare=compares, success=puts, failure=ranges))
        if resp.succeeded:
            return None
        return [_kv(r.response_range.kvs[0]) if r.response_range.kvs else None for r in resp.responses]

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it is unchanged since ``mod_revision``. None on success, else what is there."""
        compare = rpc_pb2.Compare(
            result=rpc_pb2.Compare.EQUAL,
            target=rpc_pb2.Compare.MOD,
            key=_wire_key(key),
            mod_revision=mod_revision,
        )
        return await self._txn(compare, key, value, lease)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete ``key`` only if it is unchanged since ``mod_revision``."""
        compare = rpc_pb2.Compare(
            result=rpc_pb2.Compare.EQUAL,
            target=rpc_pb2.Compare.MOD,
            key=_wire_key(key),
            mod_revision=mod_revision,
        )
        request = rpc_pb2.TxnRequest(
            compare=[compare],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=_wire_key(key)))],
        )
        resp = await self._call("kv", "Txn", request)
        return bool(resp.succeeded)

    async def _txn(self, compare: Any, key: str, value: bytes, lease: int) -> KeyValue | None:
        request = rpc_pb2.TxnRequest(
            compare=[compare],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=_wire_key(key), value=value, lease=lease))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=_wire_key(key)))],
        )
        resp = await self._call("kv", "Txn", request)
        if resp.succeeded:
            return None
        kvs = resp.responses[0].response_range.kvs
        # An empty answer means the key vanished between compare and range: report it as a bare conflict.
        return _kv(kvs[0]) if kvs else KeyValue(key, b"", 0, 0)

    async def compact(self, revision: int) -> None:
        await self._call("kv", "Compact", rpc_pb2.CompactionRequest(revision=revision, physical=True))

    # --- leases -----------------------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._call("lease", "LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise StoreError(f"etcd refused a lease of {ttl} s: {resp.error}")
        return int(resp.ID)

    async def hold_lease(
        self,
        lease_id: int,
        ttl: int,
        *,
        first_in: float,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        """Keep a lease alive until etcd says it is gone, then return. Raises StoreUnavailable when the stream
        fails or stops answering; the caller holds it again on a new stream.

        As etcd's own client does: one LeaseKeepAlive stream, a request every TTL/3 (the first after
        ``first_in`` s) whether or not the earlier ones were answered yet, and the answers read as they come.
        A late answer then costs nothing: the lease lives as long as etcd hears from us. Waiting for each answer
        before sending the next (and giving up on the stream after a deadline) put every delay of a busy event
        loop in series, and a thousand simulated agents on two cores lost hundreds of 10 s leases that way.
        The lease is declared lost only by etcd (an answer with TTL 0), never by our clock.
        """
        conn = self._connection()
        call = conn.lease.LeaseKeepAlive()  # no deadline: it lives as long as it works
        loop = asyncio.get_running_loop()
        unanswered: collections.deque[float] = collections.deque()  # when each request awaiting its answer left
        # Answers later than this mean the stream (or etcd) is stuck, not slow: by now the lease has expired
        # unless some request got through, so a new stream (or the next endpoint) loses nothing.
        patience = max(self._call_timeout, float(ttl))

        async def read_answers() -> None:
            while True:
                try:
                    resp = await call.read()
                except asyncio.CancelledError:
                    if not _cut_off_by_grpc():
                        raise
                    raise StoreUnavailable("the keepalive stream was cut off (failover)") from None
                if resp is grpc.aio.EOF:
                    raise StoreUnavailable("it closed the keepalive stream")
                if unanswered:  # etcd answers a stream's requests in order, one by one
                    unanswered.popleft()
                if resp.TTL <= 0:
                    return
                # The latest, not the largest: an etcd rebuilt from scratch starts counting again.
                self.known_revision = resp.header.revision
                self._set_health(True)
                if on_renewed is not None:
                    on_renewed()

        reader = loop.create_task(read_answers(), name=f"lease-{lease_id:x}-answers")
        reader.add_done_callback(_retrieve)
        try:
            # Refreshes keep to a schedule rather than waiting an interval after each write: on a busy loop the
            # wake-up and the write take their own time, and adding it to every interval stretched the gaps
            # between refreshes past a 10 s TTL (seen with a thousand agents on two cores).
            due = loop.time() + first_in
            while True:
                await asyncio.wait((reader,), timeout=max(0.0, due - loop.time()))
                if reader.done():
                    await reader  # returns: etcd says the lease is gone; raises: the stream failed
                    return
                now = loop.time()
                if unanswered and now - unanswered[0] > patience:
                    raise TimeoutError
                unanswered.append(now)  # before the write: its answer may be read before the write returns
                try:
                    async with asyncio.timeout(patience):
                        await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
                except asyncio.CancelledError:
                    if not _cut_off_by_grpc():
                        raise
                    raise StoreUnavailable("the keepalive stream was cut off (failover)") from None
                # After a stall longer than an interval, start afresh from now instead of catching up in a burst.
                due = max(due, loop.time() - ttl / 3) + lease_refresh_interval(ttl)
        except (TimeoutError, StoreUnavailable, *_STREAM_FAILURES) as exc:
            self._fail_over(conn, exc)
            reason = f"no keepalive answer for {patience:.0f} s" if isinstance(exc, TimeoutError) else _reason(exc)
            raise StoreUnavailable(f"etcd at {conn.endpoint.target} is unavailable: {reason}") from None
        finally:
            reader.cancel()
            call.cancel()

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseNotFound):  # gone already: what revoking wanted
            await self._call("lease", "LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=lease_id))

    async def lease_time_left(self, lease_id: int) -> int:
        """Seconds left on a lease; -1 when it has expired or never existed."""
        resp = await self._call("lease", "LeaseTimeToLive", rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id))
        return int(resp.TTL)

    # --- watch ------------------------------------------------------------------------------------------------

    async def observe(
        self,
        prefix: str,
        *,
        quiet_interval: float = 5.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[WatchResult, None]:
        """Yield a snapshot of ``prefix``, then its changes, forever; never skips a revision.

        After an error the watch resumes from the last delivered revision (no snapshot needed); only when that
        revision has been compacted away is a new snapshot listed and yielded. ``quiet_interval`` is how long
        the stream may be silent before a progress request is sent and how long the answer may take.
        ``on_restart`` is told why the watch restarted (``error``, ``stalled``, ``compacted``, ``behind``).
        """
        backoff = Backoff()
        next_revision: int | None = None
        while True:
            try:
                if next_revision is None:
                    snapshot = await self.list_prefix(prefix)
                    next_revision = snapshot.revision + 1
                    yield snapshot
                async for events in self._watch(prefix, next_revision, quiet_interval):
                    backoff.reset()
                    next_revision = events.revision + 1
                    yield events
            except RevisionCompacted:
                log.info("watch revision %s was compacted; listing %s again", next_revision, prefix)
                next_revision = None
                reason = "compacted"
            except WatchStalled as exc:
                log.warning("%s; resuming from revision %s", exc, next_revision)
                reason = "stalled"
            except WatchBehind as exc:
                log.info("%s; resuming from revision %s to catch up in batches", exc, next_revision)
                reason = "behind"
            except StoreUnavailable as exc:
                log.warning("%s; watch resumes from revision %s", exc, next_revision)
                reason = "error"
                await asyncio.sleep(backoff.delay())
            if on_restart is not None:
                on_restart(reason)

    async def _watch(self, prefix: str, start_revision: int, quiet_interval: float) -> AsyncIterator[Events]:
        conn = self._connection()
        raw = _wire_key(prefix)
        call = conn.watch()
        # Confirming takes one answer, but under load it waits behind everything else on a busy loop and etcd;
        # giving up too early restarts the watch and adds load where there is already too much.
        confirm_within = self._call_timeout + quiet_interval
        guard = _WatchGuard(call, conn.endpoint.target, confirm_within=confirm_within, quiet=quiet_interval)
        guarding: asyncio.Task[None] | None = None
        try:
            create = rpc_pb2.WatchCreateRequest(
                key=raw, range_end=prefix_range_end(raw), start_revision=start_revision, progress_notify=True
            )
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=create))
            except asyncio.CancelledError:
                if not _cut_off_by_grpc():
                    raise
                raise StoreUnavailable(f"the watch on etcd at {conn.endpoint.target} was cut off") from None
            guarding = asyncio.get_running_loop().create_task(guard.run(), name=f"watch-guard-{prefix}")
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    if not _cut_off_by_grpc():
                        raise  # we are being cancelled: the agent is stopping
                    # The guard gave up on the stream, or a failover elsewhere (the lease keepalive) closed the
                    # channel the watch shares: either way the watch resumes, on this endpoint or the next.
                    if guard.stalled is not None:
                        raise WatchStalled(guard.stalled) from None
                    raise StoreUnavailable(f"the watch on etcd at {conn.endpoint.target} was cut off") from None
                if response is grpc.aio.EOF:
                    raise StoreUnavailable(f"etcd at {conn.endpoint.target} closed the watch stream")
                if response is None:  # our decoder refused the answer (gRPC logs why): resume on a new stream
                    raise StoreUnavailable(f"etcd at {conn.endpoint.target} sent a watch answer that does not decode")
                guard.heard()
                answer = cast(WatchAnswer, response)  # decode_watch_response made it
                self._check(answer, start_revision)
                if not guard.confirmed:  # the first answer confirms the watch
                    guard.confirmed = True
                    self._set_health(True)
                if answer.events:
                    revision = max(event.kv.mod_revision for event in answer.events)
                    yield Events(answer.events, revision)
                    if self.known_revision - revision > CATCH_UP_GAP:
                        raise WatchBehind(f"watch at revision {revision}, etcd at {self.known_revision} or later")
        except StoreUnavailable as exc:  # WatchStalled, a closed stream, a watch etcd canceled
            self._fail_over(conn, exc)
            raise
        except _STREAM_FAILURES as exc:
            self._fail_over(conn, exc)
            raise StoreUnavailable(f"watch on etcd at {conn.endpoint.target} failed: {_reason(exc)}") from None
        finally:
            if guarding is not None:
                guarding.cancel()
            call.cancel()

    @staticmethod
    def _check(response: WatchAnswer, start_revision: int) -> None:
        if response.compact_revision:
            raise RevisionCompacted(f"revision {start_revision} compacted (now {response.compact_revision})")
        if response.canceled:
            raise StoreUnavailable(f"etcd canceled the watch: {response.cancel_reason or 'no reason given'}")


class _WatchGuard:
    """Notices a watch stream that went silent, beside the reads rather than around each one.

    The stream must confirm the watch within ``confirm_within`` s; after that, once it has been quiet for
    ``quiet`` s, a progress request is sent, and if nothing arrives for another ``quiet`` s the guard records
    why and cancels the call, which ends the pending read. (A timeout around every read cost a timer per
    message: a tenth of a busy agent's CPU, with a thousand agents starting at once.)
    """

    def __init__(self, call: Any, target: str, *, confirm_within: float, quiet: float) -> None:
        self._call = call
        self._target = target
        self._confirm_within = confirm_within
        self._quiet = quiet
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()
        self.confirmed = False
        self.stalled: str | None = None  # why the guard gave up on the stream

    def heard(self) -> None:
        self.last_heard = self._loop.time()

    async def run(self) -> None:
        self.heard()  # the clock starts once the create request is out (the guard is started after writing it)
        try:
            while True:
                limit = self._quiet if self.confirmed else self._confirm_within
                quiet_for = self._loop.time() - self.last_heard
                if quiet_for < limit:
                    await asyncio.sleep(limit - quiet_for)
                    continue
                if not self.confirmed:
                    return self._give_up(f"etcd at {self._target} did not confirm the watch in time")
                # Progress answers only prove the stream is alive. etcd 3.4 can send one ahead of events it
                # still owes an unsynced watcher, so they never move the resume revision.
                heard = self.last_heard
                await self._call.write(_PROGRESS_REQUEST)
                await asyncio.sleep(self._quiet)
                if self.last_heard == heard:
                    return self._give_up(f"watch on etcd at {self._target} stopped answering")
        except _STREAM_FAILURES:
            return  # the stream broke: the pending read reports it

    def _give_up(self, why: str) -> None:
        self.stalled = why
        self._call.cancel()


def _cut_off_by_grpc() -> bool:
    """Whether a CancelledError that reached the current task came from gRPC rather than from someone cancelling
    the task. gRPC cancels every call on a channel that is closed (a failover does that), and awaiting such a
    call raises CancelledError: taken for a request to stop, it ended every agent when etcd lost its quorum."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a helper task's failure as seen: its owner may be gone (cancelled) before it could await it."""
    if not task.cancelled():
        task.exception()


def _reason(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    if isinstance(error, StoreError):
        return str(error)
    return f"the call ended under us ({type(error).__name__}: {error})"
