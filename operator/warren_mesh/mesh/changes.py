"""What one watch batch changed in the mesh view: the value the observe stage hands on, and its running sum.

The view (mesh/view.py) returns a ``Changes`` for every batch it folds in; nothing else reads its insides. The
decide stage sums the batches that arrived since its last pass (``ChangeLog``): a pass costs what those batches
touched, not what the mesh holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record version the view refused, and why (reported once per version)."""

    key: str
    reason: str
    message: str


class Changes(NamedTuple):
    """What a batch (or a run of batches) changed.

    ``everything`` is set when the change cannot be pinned to single records (a snapshot, a config change): the
    consumer must then look at the whole view again.
    """

    # A NamedTuple, not a frozen dataclass: made once per watch batch or pass on every agent, and a tuple is built
    # in C (a frozen dataclass sets each field through object.__setattr__).

    everything: bool
    nodes: frozenset[str] = frozenset()
    peers: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()  # addresses whose holder changed
    # node name -> publish time of the node records accepted (for convergence lag)
    published: Mapping[str, float] = MappingProxyType({})
    rejections: tuple[Rejection, ...] = ()


class ChangeLog:
    """The sum of the batches seen since the last ``take()`` (everything, before the first)."""

    def __init__(self) -> None:
        self._everything = True
        self._nodes: set[str] = set()
        self._peers: set[str] = set()
        self._addresses: set[str] = set()
        self._published: dict[str, float] = {}

    def add(self, changes: Changes) -> None:
        self._everything |= changes.everything
        self._nodes |= changes.nodes
        self._peers |= changes.peers
        self._addresses |= changes.addresses
        self._published.update(changes.published)

    def take(self) -> Changes:
        """What changed since the last call; the log starts empty again."""
        changes = Changes(
            self._everything,
            frozenset(self._nodes),
            frozenset(self._peers),
            frozenset(self._addresses),
            self._published,
        )
        self._everything = False
        self._nodes, self._peers, self._addresses, self._published = set(), set(), set(), {}
        return changes
