"""Damping: a node that rewrites its record many times a second is followed at a bounded rate, its latest record
winning, so that one node's flood does not slow every other node's joins (issue 28).

Every write of a node record reaches every agent, which decodes it, folds it and updates its device: a node (or
whoever holds its credential) rewriting its own valid record 300 times a second made an honest join take 8-12
times as long to reach every agent. An honest node writes its record a few times when it registers and then
rarely (an observation that changed, a key rotation): a token bucket per node, ``BURST`` updates at once and
``RATE`` a second after that, never holds one back. Updates past it wait, the newest replacing the one before,
and are applied as tokens come back; a node's first record and its deletion are never held back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from warren_mesh.values.watch import KeyValue

RATE: Final = 2.0  # updates of one node's record applied per second, sustained
BURST: Final = 10.0


class Damper:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # node -> (tokens, when counted)
        self._held: dict[str, KeyValue] = {}  # node -> its newest record not applied yet

    def admit(self, name: str, kv: KeyValue) -> bool:
        """Whether this update of ``name``'s record is applied now; if not, it is held (replacing any held one)."""
        if self._take(name):
            self._held.pop(name, None)
            return True
        self._held[name] = kv
        return False

    def forget(self, name: str) -> None:
        """``name``'s record is gone: nothing of it is held any more."""
        self._held.pop(name, None)
        self._buckets.pop(name, None)

    def clear(self) -> None:
        self._held.clear()
        self._buckets.clear()

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def due(self) -> list[KeyValue]:
        """The held records whose nodes may update again, no longer held: to be put again (``admit`` lets
        them through)."""
        now = self._clock()
        ready = [name for name in self._held if self._tokens(name, now) >= 1.0]
        return [self._held.pop(name) for name in ready]

    def next_due(self) -> float | None:
        """Seconds until the first held record is due (None: nothing is held)."""
        if not self._held:
            return None
        now = self._clock()
        return min(max(0.0, (1.0 - self._tokens(name, now)) / RATE) for name in self._held)

    def _tokens(self, name: str, now: float) -> float:
        tokens, since = self._buckets.get(name, (BURST, now))
        return min(BURST, tokens + (now - since) * RATE)

    def _take(self, name: str) -> bool:
        now = self._clock()
        tokens = self._tokens(name, now)
        if tokens < 1.0:
            self._buckets[name] = (tokens, now)
            return False
        self._buckets[name] = (tokens - 1.0, now)
        return True
