"""The watch guard's rules (store/watcher.py WatchGuard): a stream that keeps answering from behind the revision a
read from its member reports is given up, as is one whose member does not answer reads or that stops answering;
one that keeps up is kept. The stream here is a stand-in: it sends progress notifications at the revision the test
says, as etcd does every second with --experimental-watch-progress-notify-interval=1s; the real case (etcd 3.4
after its members were restarted) is tests/integration/test_etcd_cluster.py, where it happened now and then."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from warren_mesh.store.watcher import (
    BEHIND_FOR,
    PROBE_FAILURES,
    WatchGuard,
    delivered_revision,
    progress_answers_reliable,
)
from warren_mesh.store.wire import WatchAnswer
from warren_mesh.values.watch import Event, KeyValue

QUIET = 0.05
PROBE_EVERY = 0.1


class _Stream:
    """Notifies progress at ``revision()`` every QUIET / 4 s (None: sends nothing), and answers our own progress
    requests the same way."""

    def __init__(self, revision: Callable[[], int | None]) -> None:
        self.revision = revision
        self.guard: WatchGuard | None = None
        self.cancelled = False

    async def write(self, request: bytes) -> None:
        self._notify()

    def _notify(self) -> None:
        revision = self.revision()
        if revision is not None and self.guard is not None:
            self.guard.heard(revision)

    async def notify_forever(self) -> None:
        while True:
            self._notify()
            await asyncio.sleep(QUIET / 4)

    def cancel(self) -> None:
        self.cancelled = True


def _guard(
    stream_at: Callable[[], int | None], read: Callable[[], int], *, for_seconds: float
) -> tuple[WatchGuard, _Stream]:
    """Run a guard over a stream at ``stream_at()`` whose member's reads say ``read()`` (raising: the read fails),
    until it gives up or ``for_seconds`` pass."""

    async def body() -> tuple[WatchGuard, _Stream]:
        stream = _Stream(stream_at)

        async def read_revision() -> int:
            return read()

        guard = WatchGuard(
            stream, "etcd-1", confirm_within=QUIET, quiet=QUIET, read_revision=read_revision, probe_every=PROBE_EVERY
        )
        stream.guard = guard
        guard.confirmed = True
        notifying = asyncio.create_task(stream.notify_forever())
        guarding = asyncio.create_task(guard.run())
        await asyncio.wait((guarding,), timeout=for_seconds)
        for task in (guarding, notifying):
            task.cancel()
        await asyncio.gather(guarding, notifying, return_exceptions=True)
        return guard, stream

    return asyncio.run(body())


def test_a_stream_that_stays_behind_what_its_member_reads_is_given_up() -> None:
    # What etcd 3.4 did for over a minute: progress every second at revision 6, the member's reads at 11.
    guard, stream = _guard(lambda: 6, lambda: 11, for_seconds=PROBE_EVERY + BEHIND_FOR * QUIET + 1)
    assert (
        guard.stalled
        == "watch on etcd at etcd-1 stays at revision 6, behind revision 11 that a read from the same member reported"
    )
    assert stream.cancelled


def test_a_stream_that_keeps_up_or_catches_up_is_kept() -> None:
    guard, stream = _guard(lambda: 11, lambda: 11, for_seconds=3 * PROBE_EVERY)
    assert guard.stalled is None and not stream.cancelled
    # Behind when read, there within the grace: a follower a moment behind its leader.
    loop_start: list[float] = []

    def catching_up() -> int:
        now = asyncio.get_running_loop().time()
        loop_start.append(now)
        return 11 if now - loop_start[0] > PROBE_EVERY + QUIET / 2 else 6

    guard, stream = _guard(catching_up, lambda: 11, for_seconds=3 * PROBE_EVERY)
    assert guard.stalled is None and not stream.cancelled


def test_a_member_that_does_not_answer_reads_is_given_up() -> None:
    def refuse() -> int:
        raise TimeoutError("no answer")

    guard, stream = _guard(lambda: 11, refuse, for_seconds=PROBE_FAILURES * PROBE_EVERY + 1)
    assert guard.stalled is not None and guard.stalled.startswith("etcd at etcd-1 does not answer reads")
    assert stream.cancelled


def test_a_stream_that_stops_answering_is_given_up() -> None:
    guard, stream = _guard(lambda: None, lambda: 11, for_seconds=1)
    assert guard.stalled == "watch on etcd at etcd-1 stopped answering"
    assert stream.cancelled


def _kv(revision: int) -> KeyValue:
    return KeyValue(key="/mesh/v1/nodes/a", value=b"", create_revision=revision, mod_revision=revision, lease=0)


def test_only_answers_that_show_delivery_move_what_the_guard_counts_as_delivered() -> None:
    """etcd 3.4.23 (Debian's) answers a progress request at once with the store's revision, ahead of events a watch
    still catching up is owed; believing it kept a watch that had stopped delivering (the etcd cluster test after
    its quorum came back). Events count by their own revision, not the header's (a catching-up watch is sent its
    events in batches, each headed with the store's revision); a new watch's confirmation counts for nothing."""
    events = WatchAnswer(revision=40, watch_id=0, events=(Event("put", _kv(12)), Event("put", _kv(15))))
    assert delivered_revision(events, progress_reliable=False) == 15
    periodic = WatchAnswer(revision=40, watch_id=0)  # etcd sends these only to a watch that is caught up
    assert delivered_revision(periodic, progress_reliable=False) == 40
    requested = WatchAnswer(revision=40, watch_id=-1)
    assert delivered_revision(requested, progress_reliable=False) == 0
    assert delivered_revision(requested, progress_reliable=True) == 40
    assert delivered_revision(WatchAnswer(revision=40, watch_id=0, created=True), progress_reliable=True) == 0


def test_progress_answers_are_trusted_from_the_releases_that_fixed_them() -> None:
    trusted = ["3.4.25", "3.4.34", "3.5.8", "3.5.16", "3.6.0", "3.6.4-rc.1"]
    untrusted = ["3.4.23", "3.4.24", "3.5.7", "3.3.27", "", "unknown", "3.5"]
    assert all(progress_answers_reliable(v) for v in trusted)
    assert not any(progress_answers_reliable(v) for v in untrusted)
