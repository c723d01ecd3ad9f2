"""Watching a key prefix of etcd without ever missing a revision or sitting on a dead stream.

``observe`` lists, then watches from the listed revision + 1, resumes after errors from the last revision it
delivered, turns a compaction into a fresh snapshot, and asks etcd for a progress report when the stream has
been quiet, and reads from the member it watches on now and then: a watch that answers nothing, or keeps
answering from behind a revision that member's own reads report, is torn down and resumed (``WatchGuard``), so a
stalled stream never goes unseen. A watch that fell far
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
    too_large,
    wire_key,
)
from warren_mesh.store.wire import RangeAnswer, WatchAnswer
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
# How often the guard reads from the member its watch is on (a linearizable read of one key: the member answers
# once it has applied everything the cluster committed before the read). With ten thousand agents, 500 reads a
# second of one key each, a small part of what etcd serves.
PROBE_EVERY: Final = 20.0
# Quiet intervals the stream has, after a read, to report a revision at least that read's; a stream that stays
# behind is given up. A follower applies a moment behind the leader, a catching-up watch within a few answers.
BEHIND_FOR: Final = 2
# Reads in a row that may fail (time out, be refused) before the member is given up.
PROBE_FAILURES: Final = 2
# etcd's answer to a progress request names no watch (clientv3.InvalidWatchID).
_ANY_WATCH: Final = -1
# The first releases whose answer to a progress request waits until every watch of the stream has been sent all it
# is owed (etcd#15220, fixed by etcd#15237); before them the answer carries the store's revision at once.
_PROGRESS_ANSWER_FIXED: Final = ((3, 4, 25), (3, 5, 8))


def progress_answers_reliable(version: str) -> bool:
    """Whether an etcd of ``version`` ("3.4.23") answers a progress request only once our watch has been sent
    everything up to the revision it reports. Unknown versions are not trusted (the guard then relies on events and
    on etcd's own periodic notifications, which it sends a watch only once it is caught up)."""
    try:
        release = tuple(int(part) for part in version.split("-", maxsplit=1)[0].split(".")[:3])
    except ValueError:
        return False
    if len(release) != 3:
        return False
    fixed_34, fixed_35 = _PROGRESS_ANSWER_FIXED
    return release >= fixed_35 or fixed_34 <= release < (3, 5, 0)


def delivered_revision(answer: WatchAnswer, *, progress_reliable: bool) -> int:
    """The revision up to which ``answer`` shows the watch was sent everything (0: it shows nothing).

    Events: the newest event's revision (the header's may be later: a watch catching up is sent its events in
    batches, each with the store's revision). etcd's periodic progress notification for our watch: its revision
    (etcd sends one only to a watch that is caught up). The answer to a progress request: its revision where the
    member's etcd is fixed (``progress_answers_reliable``); etcd 3.4.23, Debian's, answers at once with the store's
    revision, ahead of what a watch still catching up is owed, and a guard that believed it kept a watch that had
    stopped delivering (tests/integration/test_etcd_cluster.py after the quorum came back, under load). The
    confirmation of a new watch: nothing (its revision is the store's, whatever the watch still owes)."""
    if answer.events:
        return max(event.kv.mod_revision for event in answer.events)
    if answer.created or answer.canceled:
        return 0
    if answer.watch_id == _ANY_WATCH:
        return answer.revision if progress_reliable else 0
    return answer.revision


class RevisionCompacted(StoreError):
    """The revision a watch wanted to resume from is gone; the consumer needs a fresh snapshot."""


class WatchStalled(StoreUnavailable):
    """The watch stream stopped answering, even to a progress request."""


class WatchAnswerTooLarge(StoreError):
    """A watch answer was larger than this client takes: etcd sends a watch that is catching up many revisions
    at once, and any node may write values of up to 1.5 MiB. Resuming would ask for the same answer again; a new
    listing (paged) and a watch from its revision skip the history instead."""


class WatchBehind(StoreError):
    """The watch fell far behind what etcd holds; resumed on a new stream, it catches up in batches."""


async def observe(
    connection: EtcdConnection,
    prefix: str,
    list_prefix: Callable[[str], Awaitable[Snapshot]],
    *,
    quiet_interval: float = 5.0,
    on_restart: Callable[[str], None] | None = None,
    listed: Snapshot | None = None,
) -> AsyncGenerator[WatchResult, None]:
    """Yield a snapshot of ``prefix`` (``listed``, if the caller has one), then its changes, forever; never skips
    a revision.

    After an error the watch resumes from the last delivered revision (no snapshot needed); only when that
    revision has been compacted away is a new snapshot listed and yielded. ``quiet_interval`` is how long
    the stream may be silent before a progress request is sent and how long the answer may take.
    ``on_restart`` is told why the watch restarted (``error``, ``stalled``, ``compacted``, ``behind``, ``too_large``).
    """
    backoff = Backoff()
    next_revision: int | None = None
    while True:
        try:
            if next_revision is None:
                snapshot, listed = (listed if listed is not None else await list_prefix(prefix)), None
                next_revision = snapshot.revision + 1
                yield snapshot
                del snapshot  # its consumer holds what it needs: its bytes need not live as long as the watch
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
        except WatchAnswerTooLarge as exc:
            log.warning("%s; listing %s again", exc, prefix)
            next_revision = None
            reason = "too_large"
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

    async def read_revision() -> int:
        """The member's revision once it has caught up with the cluster: the header of a linearizable read of one
        key (the prefix itself; its value does not matter), on the watch's own connection."""
        request = rpc_pb2.RangeRequest(key=raw, keys_only=True, limit=1)
        answer: RangeAnswer = await conn.decoded.Range(request, timeout=connection.call_timeout)
        return answer.revision

    guard = WatchGuard(
        call, conn.endpoint.target, confirm_within=confirm_within, quiet=quiet_interval, read_revision=read_revision
    )
    guard.heard(start_revision - 1)  # everything before it was delivered on an earlier stream, or listed
    guarding: asyncio.Task[None] | None = None
    try:
        progress_reliable = progress_answers_reliable(await connection.member_version(conn))
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
            guard.heard(delivered_revision(answer, progress_reliable=progress_reliable))
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
        if too_large(exc):  # our own limit, not etcd's failure: no failover
            raise WatchAnswerTooLarge(f"a watch answer of etcd at {conn.endpoint.target} was too large") from None
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

    A stream that answers can still be stuck: with etcd 3.4, after its members were killed and restarted, one
    agent's watch and its lease answers stayed at revision 6 for over a minute, progress notifications every
    second included, while other agents on the same member were at 11; the agent never saw the node that joined
    (tests/integration/test_etcd_cluster.py, about one run in ten under load). Lease renewals are forwarded to
    the leader but answered with the member's own revision, so they cannot tell. A linearizable read can: the
    member answers it only once it has applied everything committed before it. So every ``PROBE_EVERY`` s the
    guard reads (``read_revision``) on the watch's connection; the stream must then report that revision or a
    later one within ``BEHIND_FOR`` quiet intervals, and reads must not fail ``PROBE_FAILURES`` times in a row;
    otherwise the stream is given up and the watch resumes on the next member.
    """

    def __init__(
        self,
        call: Any,
        target: str,
        *,
        confirm_within: float,
        quiet: float,
        read_revision: Callable[[], Awaitable[int]] | None = None,
        probe_every: float = PROBE_EVERY,
    ) -> None:
        self._call = call
        self._target = target
        self._confirm_within = confirm_within
        self._quiet = quiet
        self._read_revision = read_revision
        self._probe_every = probe_every
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()
        self.revision = 0  # the revision up to which the stream was sent everything (delivered_revision)
        self.confirmed = False
        self.stalled: str | None = None  # why the guard gave up on the stream

    def heard(self, revision: int = 0) -> None:
        self.last_heard = self._loop.time()
        self.revision = max(self.revision, revision)

    async def run(self) -> None:
        self.heard()  # the clock starts once the create request is out (the guard is started after writing it)
        loop = self._loop
        next_read = loop.time() + self._probe_every
        owed: tuple[int, float] | None = None  # a revision a read reported, and by when the stream must reach it
        failed_reads = 0
        try:
            while True:
                now = loop.time()
                quiet_for = now - self.last_heard
                if not self.confirmed:
                    if quiet_for >= self._confirm_within:
                        return self._give_up(f"etcd at {self._target} did not confirm the watch in time")
                elif quiet_for >= self._quiet:
                    # Progress answers only prove the stream is alive. etcd 3.4 can send one ahead of events it
                    # still owes an unsynced watcher, so they never move the resume revision.
                    heard = self.last_heard
                    await self._call.write(_PROGRESS_REQUEST)
                    await asyncio.sleep(self._quiet)
                    if self.last_heard == heard:
                        return self._give_up(f"watch on etcd at {self._target} stopped answering")
                    continue
                if owed is not None and self.revision >= owed[0]:
                    owed = None
                elif owed is not None and now >= owed[1]:
                    return self._give_up(
                        f"watch on etcd at {self._target} stays at revision {self.revision}, behind revision "
                        f"{owed[0]} that a read from the same member reported"
                    )
                if self._read_revision is not None and self.confirmed and now >= next_read:
                    next_read = now + self._probe_every
                    try:
                        read = await asyncio.wait_for(self._read_revision(), self._confirm_within)
                    except (*STREAM_FAILURES, TimeoutError) as exc:
                        failed_reads += 1
                        if failed_reads >= PROBE_FAILURES:
                            return self._give_up(f"etcd at {self._target} does not answer reads: {exc!r}")
                        continue
                    failed_reads = 0
                    if self.revision < read and owed is None:
                        owed = (read, loop.time() + BEHIND_FOR * self._quiet)
                    continue
                wake = [self.last_heard + (self._quiet if self.confirmed else self._confirm_within)]
                if self._read_revision is not None:
                    wake.append(next_read)
                if owed is not None:
                    wake.append(owed[1])
                await asyncio.sleep(max(0.0, min(wake) - loop.time()))
        except STREAM_FAILURES:
            return  # the stream broke: the pending read reports it

    def _give_up(self, why: str) -> None:
        self.stalled = why
        self._call.cancel()
