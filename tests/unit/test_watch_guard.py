"""The watch guard's rule (store/watcher.py WatchGuard): a stream that answers from behind a revision etcd's quorum
already reported is given up, one that keeps up or catches up is kept. The stream is a stand-in that answers each
progress request the way the test says; the real one (etcd 3.4 after a member restart) is in
tests/integration/test_etcd_cluster.py, where it happens now and then."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from warren_mesh.store.watcher import _PROGRESS_REQUEST, BEHIND_ROUNDS, WatchGuard

QUIET = 0.02


class _Stream:
    """Answers each progress request with the revision ``answer(round)`` gives (None: no answer)."""

    def __init__(self, answer: Callable[[int], int | None], rounds: int) -> None:
        self.answer = answer
        self.guard: WatchGuard | None = None
        self.rounds = 0
        self.enough = asyncio.Event()  # set after ``rounds`` progress requests
        self._enough_at = rounds
        self.cancelled = False

    async def write(self, request: bytes) -> None:
        assert request == _PROGRESS_REQUEST
        self.rounds += 1
        if self.rounds >= self._enough_at:
            self.enough.set()
        revision = self.answer(self.rounds)
        if revision is not None and self.guard is not None:
            self.guard.heard(revision)

    def cancel(self) -> None:
        self.cancelled = True


def _guarded(answer: Callable[[int], int | None], known: int, rounds: int) -> tuple[WatchGuard, _Stream]:
    """Run a guard over a stream that answers as ``answer`` says (confirmed at the revision it answers first;
    etcd's quorum at ``known``) until it gives up or ``rounds`` progress rounds passed."""
    return asyncio.run(_guard(_Stream(answer, rounds), known))


async def _guard(stream: _Stream, known: int) -> tuple[WatchGuard, _Stream]:
    guard = WatchGuard(stream, "etcd-1", confirm_within=QUIET, quiet=QUIET, known_revision=lambda: known)
    stream.guard = guard
    guard.heard(stream.answer(0) or known)
    guard.confirmed = True
    task = asyncio.create_task(guard.run())
    enough = asyncio.create_task(stream.enough.wait())
    await asyncio.wait((task, enough), return_when=asyncio.FIRST_COMPLETED)
    for waiting in (task, enough):
        waiting.cancel()
    await asyncio.gather(task, enough, return_exceptions=True)
    return guard, stream


def test_a_stream_that_answers_from_behind_the_reported_revision_is_given_up() -> None:
    # What etcd 3.4 answered, for over a minute, on a member at revision 12.
    guard, stream = _guarded(lambda _: 6, known=12, rounds=BEHIND_ROUNDS + 3)
    assert guard.stalled == "watch on etcd at etcd-1 stays at revision 6, behind revision 12 that etcd reported"
    assert stream.cancelled and stream.rounds == BEHIND_ROUNDS


def test_a_stream_at_the_reported_revision_or_one_that_catches_up_is_kept() -> None:
    for answer in (lambda _: 12, lambda round: 11 if round < BEHIND_ROUNDS else 12):
        guard, stream = _guarded(answer, known=12, rounds=BEHIND_ROUNDS + 3)
        assert guard.stalled is None and not stream.cancelled


def test_a_stream_that_stops_answering_is_given_up_at_once() -> None:
    guard, stream = _guarded(lambda _: None, known=12, rounds=5)
    assert guard.stalled == "watch on etcd at etcd-1 stopped answering"
    assert stream.rounds == 1
