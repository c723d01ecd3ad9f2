"""One client's connection to etcd: a gRPC channel to one endpoint at a time, deadlines on every call, failover
to the next endpoint when one fails, and the health that callers report (``warren_mesh_etcd_up``).

The key-values (store/etcd.py), the lease keepalive (store/leases.py) and the watch (store/watcher.py) all go
through one ``EtcdConnection``, so a failover moves them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from warren_mesh.store import runtime

runtime.prepare()  # before gRPC and protobuf are first imported (below)

import grpc  # noqa: E402
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc  # noqa: E402

from warren_mesh.identity import pki  # noqa: E402
from warren_mesh.identity.etcd_tls import EtcdTls  # noqa: E402
from warren_mesh.store.base import AnswerTooLarge, LeaseNotFound, StoreError, StoreUnavailable  # noqa: E402
from warren_mesh.store.wire import decode_range_response, decode_watch_response  # noqa: E402
from warren_mesh.values.netaddr import EtcdEndpoint, parse_endpoints  # noqa: E402
from warren_mesh.values.watch import KeyValue  # noqa: E402

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
STREAM_FAILURES: Final = (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError)
# The most one Range answer may hold: a page of a listing (store/etcd.py pages them to fit), or one key. Records are
# at most 16 KiB (trust/decode.py), so a single record always fits; a value larger than this (any node may write
# up to etcd's 1.5 MiB under its own keys) is never fetched.
RANGE_ANSWER_BYTES: Final = 1024 * 1024
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
    # Range answers are capped far lower: a listing is paged (store/etcd.py), and any node may write values of up
    # to etcd's request limit (1.5 MiB) under its own keys; no answer of another node's data may be unbounded.
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": "etcdserverpb.KV", "method": "Range"}],
                        "maxResponseMessageBytes": RANGE_ANSWER_BYTES,
                    }
                ]
            }
        ),
    ),
    # Connections of our own: by default gRPC shares subchannels between channels of one process, so a new store
    # would inherit another's reconnect backoff (and fail at once, right after etcd came back), and simulated
    # agents in one process would share one connection instead of having their own as real agents do.
    ("grpc.use_local_subchannel_pool", 1),
)


# etcd's answer when its auth store changed between receiving a request and applying it (ErrAuthOldRevision).
_AUTH_OLD_REVISION: Final = "revision of auth store is old"
_AUTH_RETRIES: Final = 10


class _AuthStoreMoved(Exception):
    pass


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range convention)."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class _Connection:
    def __init__(self, endpoint: EtcdEndpoint, credentials: grpc.ChannelCredentials | None) -> None:
        self.endpoint = endpoint
        if endpoint.secure:
            self.channel = grpc.aio.secure_channel(
                endpoint.target, credentials or grpc.ssl_channel_credentials(), options=_CHANNEL_OPTIONS
            )
        else:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self.version: str | None = None  # the member's etcd release, once asked (store/watcher.py needs it)
        self.auth = rpc_pb2_grpc.AuthStub(self.channel)
        # Requests encoded by hand: fields of etcd 3.4 that the etcd3 package's protocol files predate.
        self.raw_auth = _RawAuth(
            self.channel.unary_unary(
                "/etcdserverpb.Auth/UserAdd",
                request_serializer=bytes,
                response_deserializer=rpc_pb2.AuthUserAddResponse.FromString,
            )
        )
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
class _RawAuth:
    UserAdd: Any


@dataclass(frozen=True, slots=True)
class _DecodedKV:
    """KV methods whose answers store.wire decodes (called like the generated stub's)."""

    Range: Any  # named as etcd's method, so _call reaches it as it reaches the generated stubs' methods


def wire_key(key: str) -> bytes:
    """A key as etcd stores it: the exact inverse of how keys are decoded (store.wire), so that a key that is not
    UTF-8 can be read, reported and deleted like any other."""
    return key.encode("utf-8", "surrogateescape")


def kv_of(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8", "surrogateescape"),  # as store.wire decodes keys
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        lease=raw.lease,
    )


class EtcdConnection:
    """The channel to the endpoint in use, with failover across ``endpoints``."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        tls: EtcdTls | None = None,
        call_timeout: float = 5.0,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self._tls = tls
        self._credentials = None
        self._tls_stamp: tuple[tuple[int, int], ...] = ()
        if tls is not None:
            self._tls_stamp = tls.stamp()
            self._credentials = _credentials(tls)
        self._index = 0
        self._conn: _Connection | None = None
        self.call_timeout = call_timeout
        self._on_health = on_health
        self._closing: set[asyncio.Task[None]] = set()
        # Whether etcd answered the last request that needs its quorum (a key-value call, a lease refresh). Watches
        # do not count: a member that lost its quorum still serves them while nothing can be written or renewed.
        self.up = False
        self.known_revision = 0  # the store revision in etcd's latest lease answer to us

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._index].target

    def reload_tls(self) -> bool:
        """Read the TLS files again if they changed on disk (a renewed certificate). Calls from now on go over a
        new connection with them; calls in flight on the old one end and are retried, as after a failover (the
        watch resumes from its revision, the lease is held again). Whether the credentials changed. Files that do
        not make a usable credential (half written, not matching) are left for the next look."""
        tls = self._tls
        if tls is None:
            return False
        stamp = tls.stamp()
        if stamp == self._tls_stamp:
            return False
        problem = pki.credential_problem(tls.cert_file, tls.key_file) if tls.cert_file and tls.key_file else None
        if problem is not None:
            log.warning("not using the changed etcd client certificate (yet): %s", problem)
            return False
        try:
            credentials = _credentials(tls)
        except OSError as exc:
            log.warning("not using the changed etcd client certificate (yet): %s", exc)
            return False
        self._credentials, self._tls_stamp = credentials, stamp
        old, self._conn = self._conn, None
        if old is not None:
            self._close_later(old)
        log.info("etcd client certificate %s reloaded; reconnecting with it", tls.cert_file)
        return True

    def _close_later(self, conn: _Connection) -> None:
        task = asyncio.get_running_loop().create_task(conn.channel.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def connection(self) -> _Connection:
        if self._conn is None:
            self._conn = _Connection(self._endpoints[self._index], self._credentials)
        return self._conn

    def set_health(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            if self._on_health is not None:
                self._on_health(up)

    def fail_over(self, conn: _Connection, error: BaseException) -> None:
        """Mark etcd down; with several endpoints, drop ``conn`` and move to the next (unless another caller did)."""
        self.set_health(False)
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
        self._close_later(conn)

    async def member_version(self, conn: _Connection) -> str:
        """The etcd release of the member ``conn`` is to ("" if it would not say: an error, a timeout), asked once
        per connection."""
        if conn.version is None:
            try:
                status = await conn.maintenance.Status(rpc_pb2.StatusRequest(), timeout=self.call_timeout)
                conn.version = str(status.version)
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not cut_off_by_grpc():
                    raise
                log.info("etcd at %s did not say its version: %s", conn.endpoint.target, exc)
                conn.version = ""
        return conn.version

    async def call(self, stub: str, method: str, request: Any) -> Any:
        for _ in range(_AUTH_RETRIES):
            try:
                return await self._call_once(stub, method, request)
            except _AuthStoreMoved:
                # etcd checked our permissions against its users and roles of a moment ago, and they changed since
                # (another node was given its role): it refused the request without applying it, so asking again is
                # safe. With per-node roles this happens whenever a node enrols while we write.
                continue
        raise StoreUnavailable(f"etcd's users and roles kept changing under {method}; retried {_AUTH_RETRIES} times")

    async def _call_once(self, stub: str, method: str, request: Any) -> Any:
        conn = self.connection()
        try:
            response = await getattr(getattr(conn, stub), method)(request, timeout=self.call_timeout)
        except asyncio.CancelledError:
            if not cut_off_by_grpc():
                raise
            raise StoreUnavailable(f"{method} on etcd at {conn.endpoint.target} was cut off (failover)") from None
        except grpc.aio.AioRpcError as exc:
            if too_large(exc):
                raise AnswerTooLarge(f"etcd's answer to {method} is too large: {exc.details()}") from None
            if exc.code() in _RETRYABLE:
                self.fail_over(conn, exc)
                details = exc.details() or ""
                hint = tls_hint(details, secure=conn.endpoint.secure)
                raise StoreUnavailable(
                    f"etcd at {conn.endpoint.target} is unavailable: {hint or f'{exc.code().name}: {details}'}"
                ) from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and _AUTH_OLD_REVISION in (exc.details() or ""):
                raise _AuthStoreMoved from None
            message = f"etcd refused {method}: {exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in (exc.details() or ""):
                raise LeaseNotFound(message) from None
            raise StoreError(message) from None
        if response is None:  # gRPC hands back None when our decoder refused the answer (and logs why)
            raise StoreUnavailable(f"etcd at {conn.endpoint.target} sent an answer to {method} that does not decode")
        self.set_health(True)
        return response

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.channel.close(grace=None)
            self._conn = None
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task


def too_large(error: BaseException) -> bool:
    """Whether a call failed on our own limit on the size of an answer (gRPC says so only in its text)."""
    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "larger than max" in (error.details() or "")
    )


def _credentials(tls: EtcdTls) -> grpc.ChannelCredentials:
    ca, key, chain = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def tls_hint(details: str, *, secure: bool) -> str | None:
    """What a connection failure of gRPC's says about TLS, in one sentence naming the flag to fix; None if it
    says nothing about TLS. (gRPC reports each case only through the text of its error.)"""
    if secure and ("CERTIFICATE_VERIFY_FAILED" in details or "BAD_SIGNATURE" in details):
        return "its certificate is not signed by the CA in --etcd-ca-file (or does not name this endpoint's host)"
    if secure and "TSI_DATA_CORRUPTED" in details:
        return (
            "it refused this client's certificate (none given, expired, or not signed by etcd's CA): check "
            "--etcd-cert-file and --etcd-key-file"
        )
    if not secure and "Socket closed" in details:
        return "it closed the connection: if etcd serves TLS, give an https:// endpoint and --etcd-ca-file"
    return None


def cut_off_by_grpc() -> bool:
    """Whether a CancelledError that reached the current task came from gRPC rather than from someone cancelling
    the task. gRPC cancels every call on a channel that is closed (a failover does that), and awaiting such a
    call raises CancelledError: taken for a request to stop, it ended every agent when etcd lost its quorum."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def retrieve(task: asyncio.Task[None]) -> None:
    """Mark a helper task's failure as seen: its owner may be gone (cancelled) before it could await it."""
    if not task.cancelled():
        task.exception()


def failure_reason(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    if isinstance(error, StoreError):
        return str(error)
    return f"the call ended under us ({type(error).__name__}: {error})"
