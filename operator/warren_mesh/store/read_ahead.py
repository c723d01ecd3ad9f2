"""Read-ahead of a watch stream: what arrived while its consumer was busy is handed over at once, as one batch.

A consumer taking one answer at a time pays its per-batch costs (a fold, a hand-over to the next stage, a
report) once per answer, and each answer waits for the one before it to be done. Behind a node rewriting its
record hundreds of times a second, an agent short of CPU fell behind that way and caught up no faster than it
fell behind: another node's join, queued behind the flood, reached its device half a second late. Reading ahead,
the answers that queued up meanwhile are merged (events stay in revision order), so a busy consumer takes fewer,
bigger batches and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Final

from warren_mesh.values.watch import Event, Events, Snapshot, WatchResult

# Answers read ahead before the reader waits for its consumer (gRPC's flow control holds the rest in etcd).
LIMIT: Final = 1000


class ReadAhead:
    """``async with ReadAhead(stream) as ahead``: ``await ahead.take(timeout)`` for what has arrived."""

    def __init__(self, stream: AsyncIterator[WatchResult], *, limit: int = LIMIT) -> None:
        self._stream = stream
        self._limit = limit
        self._queue: deque[WatchResult] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._failure: BaseException | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReadAhead:
        self.start()
        return self

    def start(self) -> None:
        """Start reading (inside the event loop; ``__aexit__`` stops it)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="watch-read-ahead")

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop reading: the stream's generator ends inside the reader."""
        if self._reader is not None:
            self._reader.cancel()  # ends the stream's generator inside it
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        try:
            async for result in self._stream:
                self._queue.append(result)
                self._arrived.set()
                if len(self._queue) >= self._limit:
                    self._room.clear()
                    await self._room.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, who decides what it means
            self._failure = exc
            self._arrived.set()

    async def take(self, timeout: float | None = None) -> list[WatchResult] | None:
        """Everything that arrived since the last call, merged (``merged``); waits up to ``timeout`` s for the
        first answer if none is there (None: as long as it takes). None if nothing came in time."""
        if not self._queue and self._failure is None:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        if not self._queue and self._failure is not None:
            raise self._failure
        results = list(self._queue)
        self._queue.clear()
        self._room.set()
        return merged(results)


def merged(results: list[WatchResult]) -> list[WatchResult]:
    """Answers in the order they came, as few as they can be: a snapshot makes everything before it moot, and
    events that follow one another are one ``Events`` (in revision order, ``revision`` the last one's)."""
    out: list[WatchResult] = []
    pending: list[Event] = []
    revision = 0
    for result in results:
        if isinstance(result, Snapshot):
            out, pending = [result], []
        else:
            pending.extend(result.events)
            revision = result.revision
    if pending:
        out.append(Events(tuple(pending), revision))
    return out
