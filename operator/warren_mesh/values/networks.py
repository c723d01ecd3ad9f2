"""Networks: a sorted, immutable sequence of networks (canonical CIDR text) that a change copies only in part.

A location's gateway peer carries the routes of every node of the other locations: 9,000 networks at 10,000
nodes. Each join or leave elsewhere adds or removes one or two of them, and building a whole new tuple for the
peer's new ``PeerSpec`` (then freeing the old one) touched all 9,000 strings on every event: it was what still
grew with N in a located agent's pass (docs/benchmarks.md, "Thousands of nodes"). Here the networks are held in
chunks: a changed value shares every chunk but the one the change falls in, so a change copies about
N / CHUNK + CHUNK references, not N.

It is a ``Sequence[str]`` that compares and hashes as the tuple of its items, so a ``PeerSpec`` holding one equals
the same peer built with a tuple. Duplicates are kept, as a sorted list would keep them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

# Chunks are split when they reach twice this: at 9,000 networks ~100-140 chunks of 64-128, so a change copies a
# chunk and the chunk index, a few hundred references.
CHUNK = 64


class Networks(Sequence[str]):
    __slots__ = ("_chunks", "_hash", "_heads", "_len", "_offsets")

    def __init__(self, networks: Iterable[str] = ()) -> None:
        items = sorted(networks)
        chunks = tuple(tuple(items[at : at + CHUNK]) for at in range(0, len(items), CHUNK))
        self._set(chunks, tuple(chunk[0] for chunk in chunks), len(items))

    @classmethod
    def _of(cls, chunks: tuple[tuple[str, ...], ...], heads: tuple[str, ...], length: int) -> Networks:
        made = cls.__new__(cls)
        made._set(chunks, heads, length)
        return made

    def _set(self, chunks: tuple[tuple[str, ...], ...], heads: tuple[str, ...], length: int) -> None:
        self._chunks, self._heads, self._len = chunks, heads, length
        self._offsets: tuple[int, ...] | None = None  # where each chunk starts, made when indexed
        self._hash: int | None = None

    def adding(self, network: str) -> Networks:
        """These and ``network``, in order (after any equal one)."""
        if not self._chunks:
            return Networks._of(((network,),), (network,), 1)
        at = max(bisect.bisect_right(self._heads, network) - 1, 0)
        chunk = list(self._chunks[at])
        bisect.insort_right(chunk, network)
        if len(chunk) < 2 * CHUNK:
            parts: tuple[tuple[str, ...], ...] = (tuple(chunk),)
        else:
            parts = (tuple(chunk[:CHUNK]), tuple(chunk[CHUNK:]))
        return self._replaced(at, parts)

    def removing(self, network: str) -> Networks:
        """These without one ``network`` (ValueError if there is none)."""
        at = bisect.bisect_left(self._heads, network) - 1
        for index in (at, at + 1):  # the first of equal ones: the end of the chunk before, or a chunk's head
            if 0 <= index < len(self._chunks):
                chunk = self._chunks[index]
                where = bisect.bisect_left(chunk, network)
                if where < len(chunk) and chunk[where] == network:
                    rest = chunk[:where] + chunk[where + 1 :]
                    return self._replaced(index, (rest,) if rest else ())
        raise ValueError(f"{network} is not among the networks")

    def _replaced(self, at: int, parts: tuple[tuple[str, ...], ...]) -> Networks:
        chunks = self._chunks[:at] + parts + self._chunks[at + 1 :]
        heads = self._heads[:at] + tuple(part[0] for part in parts) + self._heads[at + 1 :]
        return Networks._of(chunks, heads, sum(map(len, parts)) - len(self._chunks[at]) + self._len)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._chunks)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        at = bisect.bisect_right(self._heads, value) - 1
        if at < 0:
            return False
        chunk = self._chunks[at]
        where = bisect.bisect_left(chunk, value)
        return where < len(chunk) and chunk[where] == value

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("Networks index out of range")
        if self._offsets is None:
            self._offsets = tuple(itertools.accumulate((len(chunk) for chunk in self._chunks), initial=0))
        at = bisect.bisect_right(self._offsets, index) - 1
        return self._chunks[at][index - self._offsets[at]]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Networks):
            # Values made from one another share their chunks, and a tuple compares shared ones by identity.
            return self._len == other._len and (self._chunks == other._chunks or tuple(self) == tuple(other))
        if isinstance(other, tuple):
            return self._len == len(other) and tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))
        return self._hash

    def __repr__(self) -> str:
        return f"Networks({tuple(self)!r})"

    def __reduce__(self) -> tuple[type[Networks], tuple[tuple[str, ...]]]:
        return Networks, (tuple(self),)


EMPTY = Networks()


__all__ = ["CHUNK", "EMPTY", "Networks"]
