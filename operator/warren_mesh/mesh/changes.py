"""What one watch batch changed in the mesh view: the value the observe stage hands on, and its running sum.

The view (mesh/view.py) returns a ``Changes`` for every batch it folds in; nothing else reads its insides. The
decide stage sums the batches that arrived since its last pass (``ChangeLog``): a pass costs what those batches
touched, not what the mesh holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
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

    # The sets are handed over, not copied (the view starts new ones for the next batch): read them, never change
    # them.
    everything: bool
    nodes: AbstractSet[str] = frozenset()
    peers: AbstractSet[str] = frozenset()
    addresses: AbstractSet[str] = frozenset()  # addresses whose holder changed
    # node name -> publish time of the node records accepted (for convergence lag)
    published: Mapping[str, float] = MappingProxyType({})
    rejections: tuple[Rejection, ...] = ()
    damped: tuple[str, ...] = ()  # nodes whose record updates were held back (past their rate; mesh/damping.py)
    cleared_rejections: bool = False  # a key rejected before is gone or valid now (the invalid records fell)

    @property
    def anything(self) -> bool:
        """Whether the view changed in a way a pass reads: not for a batch whose updates were all held back (a
        flooding node's), where a pass would find nothing to do; at hundreds of writes a second such passes were
        most of what the flood cost every agent."""
        return (
            self.everything
            or bool(self.nodes or self.peers or self.addresses or self.rejections)
            or self.cleared_rejections
        )


class ChangeLog:
    """The sum of the batches seen since the last ``take()`` (everything, before the first). A pass usually
    follows a single batch: that batch's value is handed on as it is, and only several are summed."""

    def __init__(self) -> None:
        self._pending: list[Changes] = [Changes(everything=True)]

    def add(self, changes: Changes) -> None:
        self._pending.append(changes)

    def take(self) -> Changes:
        """What changed since the last call; the log starts empty again."""
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            return pending[0]
        nodes: set[str] = set()
        peers: set[str] = set()
        addresses: set[str] = set()
        published: dict[str, float] = {}
        for changes in pending:
            nodes |= changes.nodes
            peers |= changes.peers
            addresses |= changes.addresses
            published.update(changes.published)
        return Changes(any(c.everything for c in pending), nodes, peers, addresses, published)
