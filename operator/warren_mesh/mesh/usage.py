"""How much of etcd each node uses under the keys only it may write (its record and its claims), and its quota.

A node's role lets it write any number of keys of any size (up to etcd's 1.5 MiB request limit) under
``claims/<node>/`` and one value at ``nodes/<node>``: with one node's credential alone, etcd could be filled to its
backend quota (2 GiB by default), after which etcd refuses every write of every node (its NOSPACE alarm). A node
needs a record (~300 bytes, at most 16 KiB) and one claim per kind and IP family: a handful of keys and a few
kB. Past the soft quota a node is reported (by every agent, `warren_mesh_node_over_quota`, and on the Mesh's
status); past the hard quota the enroller, which holds etcd's root credential, takes its write role away until an
administrator restores it (`warren-mesh etcd-auth restore`, docs/security.md#quotas).

Usage is folded from the watch of the mesh's root (a listing, then events), like the view, in one pass per key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from warren_mesh.trust.fields import validate_name
from warren_mesh.trust.reasons import RecordError
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Events, KeyValue, Snapshot, WatchResult

Level = Literal["soft", "hard"]


@dataclass(frozen=True, slots=True)
class Quota:
    """Keys and bytes (keys plus values) a node may hold under its own keys. The defaults are 10-100x what one
    node needs, so no honest node comes near them, and 10,000 nodes at the hard limit fit etcd's default 2 GiB."""

    soft_keys: int = 16
    soft_bytes: int = 64 * 1024
    hard_keys: int = 64
    hard_bytes: int = 192 * 1024

    def __post_init__(self) -> None:
        if not (0 < self.soft_keys <= self.hard_keys and 0 < self.soft_bytes <= self.hard_bytes):
            raise ValueError(f"a quota's soft limits must be positive and at most its hard ones: {self}")


DEFAULT_QUOTA: Final = Quota()


@dataclass(slots=True)
class Usage:
    keys: int = 0
    bytes: int = 0

    def over(self, quota: Quota) -> tuple[Level, str] | None:
        """Which limit this usage is past, and a one-line why; None within the soft quota."""
        if self.keys > quota.hard_keys or self.bytes > quota.hard_bytes:
            return "hard", self._beyond("hard", quota.hard_keys, quota.hard_bytes)
        if self.keys > quota.soft_keys or self.bytes > quota.soft_bytes:
            return "soft", self._beyond("soft", quota.soft_keys, quota.soft_bytes)
        return None

    def _beyond(self, level: Level, keys: int, size: int) -> str:
        return f"{self.keys} keys and {self.bytes} bytes, over the {level} quota of {keys} keys or {size} bytes"


class NodeUsage:
    """Per node: the keys and bytes under ``nodes/<node>`` and ``claims/<node>/``, as of the last result applied.
    A value never fetched (``KeyValue.oversize``) counts with the size it is known to exceed."""

    def __init__(self, schema: KeySchema) -> None:
        self._schema = schema
        self._sizes: dict[str, tuple[str, int]] = {}  # key -> (owner, bytes)
        self.by_node: dict[str, Usage] = {}

    def owner(self, key: str) -> str | None:
        """The node whose role may write ``key``; None for keys only the operator or the admin may write (no
        node's role covers a name that is not a valid node name: the enroller and `etcd-auth` refuse those)."""
        if key.startswith(self._schema.nodes):
            name = key[len(self._schema.nodes) :]
        elif key.startswith(self._schema.claims):
            name, slash, _ = key[len(self._schema.claims) :].partition("/")
            if not slash:
                return None
        else:
            return None
        if name in self.by_node:
            return name  # checked when its first key came
        try:
            return validate_name(name)
        except RecordError:
            return None

    def apply(self, result: WatchResult) -> set[str]:
        """Fold ``result`` in; the nodes whose usage it may have changed."""
        touched: set[str] = set()
        if isinstance(result, Snapshot):
            touched.update(self.by_node)
            self._sizes.clear()
            self.by_node.clear()
            for kv in result.items:
                touched.add(self._put(kv) or "")
        elif isinstance(result, Events):
            for event in result.events:
                touched.add(self._drop(event.kv.key) or "")
                if event.kind == "put":
                    touched.add(self._put(event.kv) or "")
        touched.discard("")
        return touched

    def verdicts(self, nodes: set[str], quota: Quota) -> dict[str, tuple[Level, str] | None]:
        """For each of ``nodes``: the limit of ``quota`` it is past and why, or None (within it, or holding no key)."""
        return {node: self.by_node[node].over(quota) if node in self.by_node else None for node in nodes}

    def over(self, quota: Quota) -> dict[str, tuple[Level, str]]:
        """Every node past a limit of ``quota``: name -> (which, why)."""
        found = {}
        for node, usage in self.by_node.items():
            verdict = usage.over(quota)
            if verdict is not None:
                found[node] = verdict
        return found

    def _put(self, kv: KeyValue) -> str | None:
        owner = self.owner(kv.key)
        if owner is None:
            return None
        size = len(kv.key.encode("utf-8", "surrogateescape")) + (kv.oversize or len(kv.value))
        self._sizes[kv.key] = (owner, size)
        usage = self.by_node.setdefault(owner, Usage())
        usage.keys += 1
        usage.bytes += size
        return owner

    def _drop(self, key: str) -> str | None:
        held = self._sizes.pop(key, None)
        if held is None:
            return None
        owner, size = held
        usage = self.by_node[owner]
        usage.keys -= 1
        usage.bytes -= size
        if usage.keys == 0:
            del self.by_node[owner]
        return owner
