"""Watching a key prefix of etcd without ever missing a revision or sitting on a dead stream.

``observe`` lists, then watches from the listed revision + 1, resumes after errors from the last revision it
delivered, turns a compaction into a fresh snapshot, and asks etcd for a progress report when the stream has
been quiet: a watch that answers nothing, or answers from a revision behind one etcd's quorum has already
reported, is torn down and resumed (``WatchGuard``), so a stalled stream never goes unseen. A watch that fell far
behind resumes on a new stream to be caught up in batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final, cast

import grpc
from etcd3.etcdrpc import rpc_pb2

from warren_mesh.store.base import Backoff, StoreError, StoreUnavailable
from warren_mesh.store.connection import (
    STREAM_FAILURES,
    EtcdConnection,
    cut_off_by_grpc,
    failure_reason,
    prefix_range_end,
    wire_key,
)
from warren_mesh.store.wire import WatchAnswer
from warren_mesh.values.watch import Events, Snapshot, WatchResult

log = logging.getLogger(__name__)

# WatchRequest field 3 is WatchProgressRequest (etcd >= 3.4), an empty message etcd3 0.12's protos do not know.
# Encoded by hand: field 3, wire type 2 (length-delimited), length 0.
_PROGRESS_REQUEST: Final = b"\x1a\x00"
# A watch this many revisions behind a revision etcd has already reported is resumed on a new stream. A watcher
# that starts behind is caught up by etcd in batches (up to 1000 revisions per answer), whereas one that fell
# behind reading keeps receiving one answer per revision, already queued for it, and each answer costs a trip
# through gRPC and the event loop. With a thousand agents starting at once, the agents that registered first
# spent half the storm reading such queues one revision at a time.
CATCH_UP_GAP: Final = 500
# Progress rounds in a row (a quiet interval each) a watch may answer from a revision older than one etcd's quorum
# reported before the round began, before it is resumed elsewhere. A follower applies a moment behind the leader,
# never a whole round; more than one round allows for a member that is catching up after a restart.
BEHIND_ROUNDS: Final = 2


class RevisionCompacted(StoreError):
    """The revision a watch wanted to resume from is gone; the consumer needs a fresh snapshot."""


class WatchStalled(StoreUnavailable):
    """The watch stream stopped answering, even to a progress request."""


class WatchBehind(StoreError):
    """The watch fell far behind what etcd holds; resumed on a new stream, it catches up in batches."""


async def observe(
    connection: EtcdConnection,
    prefix: str,
    list_prefix: Callable[[str], Awaitable[Snapshot]],
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
                snapshot = await list_prefix(prefix)
                next_revision = snapshot.revision + 1
                yield snapshot
            async for events in _watch(connection, prefix, next_revision, quiet_interval):
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


async def _watch(
    connection: EtcdConnection, prefix: str, start_revision: int, quiet_interval: float
) -> AsyncIterator[Events]:
    conn = connection.connection()
    raw = wire_key(prefix)
    call = conn.watch()
    # Confirming takes one answer, but under load it waits behind everything else on a busy loop and etcd;
    # giving up too early restarts the watch and adds load where there is already too much.
    confirm_within = connection.call_timeout + quiet_interval
    guard = WatchGuard(
        call,
        conn.endpoint.target,
        confirm_within=confirm_within,
        quiet=quiet_interval,
        known_revision=lambda: connection.known_revision,
    )
    guarding: asyncio.Task[None] | None = None
    try:
        create = rpc_pb2.WatchCreateRequest(
            key=raw, range_end=prefix_range_end(raw), start_revision=start_revision, progress_notify=True
        )
        try:
            await call.write(rpc_pb2.WatchRequest(create_request=create))
        except asyncio.CancelledError:
            if not cut_off_by_grpc():
                raise
            raise StoreUnavailable(f"the watch on etcd at {conn.endpoint.target} was cut off") from None
        guarding = asyncio.get_running_loop().create_task(guard.run(), name=f"watch-guard-{prefix}")
        while True:
            try:
                response = await call.read()
            except asyncio.CancelledError:
                if not cut_off_by_grpc():
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
            answer = cast(WatchAnswer, response)  # decode_watch_response made it
            guard.heard(answer.revision)
            _check(answer, start_revision)
            # The first answer confirms the watch. It says nothing of etcd's health: a member that lost its quorum
            # still serves watches, while nothing can be written or renewed (see EtcdConnection.up).
            guard.confirmed = True
            if answer.events:
                revision = max(event.kv.mod_revision for event in answer.events)
                yield Events(answer.events, revision)
                if connection.known_revision - revision > CATCH_UP_GAP:
                    raise WatchBehind(f"watch at revision {revision}, etcd at {connection.known_revision} or later")
    except StoreUnavailable as exc:  # WatchStalled, a closed stream, a watch etcd canceled
        connection.fail_over(conn, exc)
        raise
    except STREAM_FAILURES as exc:
        connection.fail_over(conn, exc)
        raise StoreUnavailable(f"watch on etcd at {conn.endpoint.target} failed: {failure_reason(exc)}") from None
    finally:
        if guarding is not None:
            guarding.cancel()
        call.cancel()


def _check(response: WatchAnswer, start_revision: int) -> None:
    if response.compact_revision:
        raise RevisionCompacted(f"revision {start_revision} compacted (now {response.compact_revision})")
    if response.canceled:
        raise StoreUnavailable(f"etcd canceled the watch: {response.cancel_reason or 'no reason given'}")


class WatchGuard:
    """Notices a watch stream that went silent, beside the reads rather than around each one.

    The stream must confirm the watch within ``confirm_within`` s; after that, once it has been quiet for
    ``quiet`` s, a progress request is sent, and if nothing arrives for another ``quiet`` s the guard records
    why and cancels the call, which ends the pending read. (A timeout around every read cost a timer per
    message: a tenth of a busy agent's CPU, with a thousand agents starting at once.)

    A stream that answers can still be stuck: etcd 3.4 served one agent's watch from revision 6 for over a
    minute after the member it was on had been restarted, answering every progress request with "revision 6"
    while the same member's other watches and the lease answers were at 12; the agent never saw the nodes that
    joined. So an answer also says which revision the stream is at, and a stream that stays behind the revision
    etcd's lease answers gave us (``known_revision``, which needs the quorum) for ``BEHIND_ROUNDS`` progress
    rounds is given up too.
    """

    def __init__(
        self,
        call: Any,
        target: str,
        *,
        confirm_within: float,
        quiet: float,
        known_revision: Callable[[], int] = lambda: 0,
    ) -> None:
        self._call = call
        self._target = target
        self._confirm_within = confirm_within
        self._quiet = quiet
        self._known_revision = known_revision
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()
        self.revision = 0  # the newest header revision the stream answered with
        self.confirmed = False
        self.stalled: str | None = None  # why the guard gave up on the stream

    def heard(self, revision: int = 0) -> None:
        self.last_heard = self._loop.time()
        self.revision = max(self.revision, revision)

    async def run(self) -> None:
        self.heard()  # the clock starts once the create request is out (the guard is started after writing it)
        behind = 0  # progress rounds in a row the stream answered from behind a revision etcd had reported
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
                heard, reported = self.last_heard, self._known_revision()
                await self._call.write(_PROGRESS_REQUEST)
                await asyncio.sleep(self._quiet)
                if self.last_heard == heard:
                    return self._give_up(f"watch on etcd at {self._target} stopped answering")
                behind = behind + 1 if self.revision < reported else 0
                if behind >= BEHIND_ROUNDS:
                    return self._give_up(
                        f"watch on etcd at {self._target} stays at revision {self.revision}, behind revision "
                        f"{reported} that etcd reported"
                    )
        except STREAM_FAILURES:
            return  # the stream broke: the pending read reports it

    def _give_up(self, why: str) -> None:
        self.stalled = why
        self._call.cancel()
