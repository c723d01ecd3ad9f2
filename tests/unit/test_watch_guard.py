"""The watch guard's rules (store/watcher.py WatchGuard): a stream that keeps answering from behind the revision a
read from its member reports is given up, as is one whose member does not answer reads or that stops answering;
one that keeps up is kept. The stream here is a stand-in: it sends progress notifications at the revision the test
says, as etcd does every second with --experimental-watch-progress-notify-interval=1s; the real case (etcd 3.4
after its members were restarted) is tests/integration/test_etcd_cluster.py, where it happened now and then."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from warren_mesh.store.watcher import BEHIND_FOR, PROBE_FAILURES, WatchGuard

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
