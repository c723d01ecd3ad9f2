"""Gateway candidacies: which nodes stand to carry their location's traffic to the others, and since when.

A node that may be its location's gateway (it has an external endpoint) says so with a key of its own,
``claims/<node>/gateway/<location>``, on its lease: a node's credential writes no other node's candidacy, and a
node that dies withdraws it when its lease expires. Of a location's candidates the oldest (lowest create
revision, then key) is its gateway, the same on every node (mesh/paths.py decides it next to the records). A
gateway that gives up deletes its key and stands again with a new one, behind every candidate that stayed: a node
that comes back never takes the role back from the one that took over (no flapping).
"""

from __future__ import annotations

from dataclasses import dataclass

from warren_mesh.trust.node_fields import validate_location
from warren_mesh.trust.reasons import REASON_INVALID_KEY, RecordError
from warren_mesh.trust.text import printable

GATEWAY_KIND = "gateway"  # the claim kind under claims/<node>/


@dataclass(frozen=True, slots=True, order=True)
class Candidacy:
    """One node standing as the gateway of ``location``; older ones (by create revision, then key) come first."""

    create_revision: int
    key: str
    node: str
    location: str


class Candidacies:
    """Every node's candidacy, by node: a node stands for one location (its record's); of several keys of one
    node only the oldest counts (a node holds one claim of each kind)."""

    def __init__(self) -> None:
        self._of_node: dict[str, dict[str, Candidacy]] = {}  # node -> its candidacy keys
        self._node_of: dict[str, str] = {}  # candidacy key -> its node
        self.by_node: dict[str, Candidacy] = {}  # the candidacy that counts, of each node that stands

    def clear(self) -> None:
        self._of_node, self._node_of, self.by_node = {}, {}, {}

    def put(self, key: str, node: str, location: str, create_revision: int) -> bool:
        """A candidacy key was written; whether the candidacy that counts for ``node`` changed."""
        try:
            validate_location(location)
        except RecordError:
            raise RecordError(REASON_INVALID_KEY, f"gateway claim {printable(key)} does not name a location") from None
        self._of_node.setdefault(node, {})[key] = Candidacy(create_revision, key, node, location)
        self._node_of[key] = node
        return self._settle(node)

    def drop(self, key: str) -> bool:
        """A candidacy key was deleted; whether the candidacy that counts for its node changed."""
        node = self._node_of.pop(key, None)
        if node is None:
            return False
        own = self._of_node[node]
        del own[key]
        if not own:
            del self._of_node[node]
        return self._settle(node)

    def _settle(self, node: str) -> bool:
        own = self._of_node.get(node)
        counts = min(own.values()) if own else None
        if self.by_node.get(node) == counts:
            return False
        if counts is None:
            del self.by_node[node]
        else:
            self.by_node[node] = counts
        return True
