"""The watch read-ahead (store/read_ahead.py): what arrived while the consumer was busy comes as one batch, in
revision order; a snapshot makes what came before it moot; the reader stops at its limit and resumes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from helpers import run
from warren_mesh.store.read_ahead import ReadAhead, merged
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot, WatchResult


def _events(*revisions: int) -> Events:
    return Events(tuple(Event("put", KeyValue(f"/k{r}", b"v", r, r)) for r in revisions), revisions[-1])


def _revisions(result: WatchResult) -> list[int]:
    items = result.items if isinstance(result, Snapshot) else tuple(e.kv for e in result.events)
    return [kv.mod_revision for kv in items]


def test_answers_that_follow_one_another_are_one_batch_and_a_snapshot_drops_what_came_before() -> None:
    snapshot = Snapshot((KeyValue("/a", b"", 5, 5),), 5)
    assert merged([_events(1), _events(2, 3)]) == [_events(1, 2, 3)]
    together = merged([_events(1), snapshot, _events(6), _events(7)])
    assert [type(r) for r in together] == [Snapshot, Events] and _revisions(together[1]) == [6, 7]
    assert merged([_events(1), snapshot]) == [snapshot] and merged([]) == []


class _Stream:
    """Answers put in by the test; counts how many the reader took."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[WatchResult | BaseException] = asyncio.Queue()
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[WatchResult]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            self.taken += 1
            yield item


def test_a_busy_consumer_takes_what_arrived_meanwhile_as_one_batch() -> None:
    async def body() -> None:
        stream = _Stream()
        async with ReadAhead(stream.__aiter__(), limit=3) as ahead:
            assert await ahead.take(timeout=0.05) is None, "nothing arrived: the wait ends at the timeout"
            for revision in range(1, 6):
                stream.queue.put_nowait(_events(revision))
            await asyncio.sleep(0.05)  # the consumer is busy; the reader stops at its limit
            assert stream.taken == 3
            first = await ahead.take()
            assert first is not None and [_revisions(r) for r in first] == [[1, 2, 3]]
            await asyncio.sleep(0.05)
            rest = await ahead.take()
            assert rest is not None and [_revisions(r) for r in rest] == [[4, 5]]
            stream.queue.put_nowait(RuntimeError("the stream broke"))
            with pytest.raises(RuntimeError, match="the stream broke"):
                await ahead.take(timeout=1)

    run(body())
