"""Holding an etcd lease: one LeaseKeepAlive stream, a refresh every TTL/3 on a schedule, answers read as they
come, and the lease declared lost only by etcd itself."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import grpc
from etcd3.etcdrpc import rpc_pb2

from warren_mesh.store.base import StoreUnavailable, lease_refresh_interval
from warren_mesh.store.connection import STREAM_FAILURES, EtcdConnection, cut_off_by_grpc, failure_reason, retrieve


async def hold_lease(
    connection: EtcdConnection,
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
    conn = connection.connection()
    call = conn.lease.LeaseKeepAlive()  # no deadline: it lives as long as it works
    loop = asyncio.get_running_loop()
    unanswered: collections.deque[float] = collections.deque()  # when each request awaiting its answer left
    # Answers later than this mean the stream (or etcd) is stuck, not slow: by now the lease has expired
    # unless some request got through, so a new stream (or the next endpoint) loses nothing.
    patience = max(connection.call_timeout, float(ttl))

    async def read_answers() -> None:
        while True:
            try:
                resp = await call.read()
            except asyncio.CancelledError:
                if not cut_off_by_grpc():
                    raise
                raise StoreUnavailable("the keepalive stream was cut off (failover)") from None
            if resp is grpc.aio.EOF:
                raise StoreUnavailable("it closed the keepalive stream")
            if unanswered:  # etcd answers a stream's requests in order, one by one
                unanswered.popleft()
            if resp.TTL <= 0:
                return
            # The latest, not the largest: an etcd rebuilt from scratch starts counting again.
            connection.known_revision = resp.header.revision
            connection.set_health(True)
            if on_renewed is not None:
                on_renewed()

    reader = loop.create_task(read_answers(), name=f"lease-{lease_id:x}-answers")
    reader.add_done_callback(retrieve)
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
                if not cut_off_by_grpc():
                    raise
                raise StoreUnavailable("the keepalive stream was cut off (failover)") from None
            # After a stall longer than an interval, start afresh from now instead of catching up in a burst.
            due = max(due, loop.time() - ttl / 3) + lease_refresh_interval(ttl)
    except (TimeoutError, StoreUnavailable, *STREAM_FAILURES) as exc:
        connection.fail_over(conn, exc)
        reason = f"no keepalive answer for {patience:.0f} s" if isinstance(exc, TimeoutError) else failure_reason(exc)
        raise StoreUnavailable(f"etcd at {conn.endpoint.target} is unavailable: {reason}") from None
    finally:
        reader.cancel()
        call.cancel()
