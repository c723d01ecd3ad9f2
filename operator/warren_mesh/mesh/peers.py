"""The mesh as the watch stream has shown it: snapshots and events folded into one validated view.

Each record is decoded once per revision, at the moment it arrives, so the cost of a change is the cost of that
record, not of the mesh. A record that cannot be decoded is rejected alone and reported once; if its key held a
valid record before, that last valid record stays in force until the key is deleted. A node whose record got
mangled is still alive (its lease is being kept), so cutting it off would punish the wrong party.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from warren_mesh.model import (
    REASON_INVALID_CONFIG,
    REASON_INVALID_FIELD,
    ExternalPeer,
    MeshConfig,
    NodeRecord,
    RecordError,
    decode_json,
    parse_ip,
)
from warren_mesh.schema import KeySchema
from warren_mesh.watch import Events, KeyValue, Snapshot, WatchResult

log = logging.getLogger(__name__)

_R = TypeVar("_R", NodeRecord, ExternalPeer)


@dataclass(frozen=True, slots=True)
class Entry(Generic[_R]):
    """A decoded record with the etcd metadata conflict resolution and liveness need."""

    record: _R
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Changes:
    """What the view saw change since the last call to ``MeshView.take_changes()``.

    ``everything`` is set when the change cannot be pinned to single records (a snapshot, a config change): the
    consumer must then look at the whole view again.
    """

    everything: bool
    nodes: frozenset[str] = frozenset()
    peers: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()  # reservations (ipam) put or deleted


@dataclass(frozen=True, slots=True)
class Rejection:
    key: str
    reason: str
    message: str


class MeshView:
    """Config, node records, external peers and address reservations under one key prefix."""

    def __init__(self, schema: KeySchema, *, on_reject: Callable[[Rejection], None] | None = None) -> None:
        self._schema = schema
        self._on_reject = on_reject
        self.config = MeshConfig()
        self._config_revision = 0
        self.nodes: dict[str, Entry[NodeRecord]] = {}
        self.peers: dict[str, Entry[ExternalPeer]] = {}
        self.ipam: dict[str, str] = {}  # overlay address -> owning node name
        self.revision = 0
        self.synced = False  # a complete snapshot has been seen; until then nothing may be removed
        # node name -> publish time of records accepted since the last call to take_published()
        self._published: dict[str, float] = {}
        self._rejected: dict[str, tuple[int, str]] = {}  # key -> (mod revision already reported, reason)
        # Changed since take_changes(): lets the agent decide from the records an event touched, not all of them.
        self._changed_everything = True
        self._changed_nodes: set[str] = set()
        self._changed_peers: set[str] = set()
        self._changed_addresses: set[str] = set()

    def apply(self, result: WatchResult) -> None:
        if isinstance(result, Snapshot):
            self._apply_snapshot(result)
        else:
            self._apply_events(result)

    def take_published(self) -> dict[str, float]:
        """Publish times of node records that arrived since the last call (for convergence lag)."""
        published, self._published = self._published, {}
        return published

    def take_changes(self) -> Changes:
        """What changed since the last call (everything, on the first call)."""
        changes = Changes(
            self._changed_everything,
            frozenset(self._changed_nodes),
            frozenset(self._changed_peers),
            frozenset(self._changed_addresses),
        )
        self._changed_everything = False
        self._changed_nodes.clear()
        self._changed_peers.clear()
        self._changed_addresses.clear()
        return changes

    @property
    def schema(self) -> KeySchema:
        return self._schema

    def rejected_by_reason(self) -> dict[str, int]:
        """Keys whose current value is rejected, counted by reason (what an operator has to fix now)."""
        return dict(Counter(reason for _, reason in self._rejected.values()))

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        present = {kv.key for kv in snapshot.items}
        for name in [n for n in self.nodes if self._schema.node(n) not in present]:
            del self.nodes[name]
        for name in [n for n in self.peers if self._schema.peer(n) not in present]:
            del self.peers[name]
        self.ipam = {}
        if self._schema.config not in present:
            self.config, self._config_revision = MeshConfig(), 0
        self._rejected = {k: r for k, r in self._rejected.items() if k in present}
        for kv in snapshot.items:
            self._put(kv)
        self.revision = snapshot.revision
        self.synced = True
        self._changed_everything = True

    def _apply_events(self, batch: Events) -> None:
        for event in batch.events:
            if event.kind == "put":
                self._put(event.kv)
            else:
                self._delete(event.kv.key)
        self.revision = batch.revision

    def _delete(self, key: str) -> None:
        self._rejected.pop(key, None)
        kind = self._schema.classify(key)
        if kind is None:
            return
        match kind:
            case ("node", name):
                self.nodes.pop(name, None)
                self._published.pop(name, None)
                self._changed_nodes.add(name)
            case ("peer", name):
                self.peers.pop(name, None)
                self._changed_peers.add(name)
            case ("ipam", address):
                self.ipam.pop(address, None)
                self._changed_addresses.add(address)
            case ("config", _):
                self.config, self._config_revision = MeshConfig(), 0
                self._changed_everything = True

    def _put(self, kv: KeyValue) -> None:
        kind = self._schema.classify(kv.key)
        if kind is None:
            return  # a key of a newer schema version or another tool: not ours to judge
        try:
            match kind:
                case ("node", name):
                    current = self.nodes.get(name)
                    if current is None or current.mod_revision != kv.mod_revision:
                        record = NodeRecord.from_json(decode_json(kv.value), key_name=name)
                        self.nodes[name] = Entry(record, kv.create_revision, kv.mod_revision, kv.lease)
                        self._published[name] = record.published_at
                        self._changed_nodes.add(name)
                case ("peer", name):
                    current_peer = self.peers.get(name)
                    if current_peer is None or current_peer.mod_revision != kv.mod_revision:
                        peer = ExternalPeer.from_json(decode_json(kv.value), key_name=name)
                        self.peers[name] = Entry(peer, kv.create_revision, kv.mod_revision, kv.lease)
                        self._changed_peers.add(name)
                case ("ipam", address):
                    self._put_reservation(address, kv.value)
                case ("config", _):
                    if kv.mod_revision != self._config_revision:
                        self.config = _decode_config(kv.value)
                        self._config_revision = kv.mod_revision
                        self._changed_everything = True
        except RecordError as exc:
            self._reject(kv, exc)
        else:
            self._rejected.pop(kv.key, None)

    def _put_reservation(self, address: str, value: bytes) -> None:
        try:
            parse_ip(address)
            owner = value.decode()
        except (ValueError, UnicodeDecodeError):
            raise RecordError(REASON_INVALID_FIELD, f"reservation {address!r} is not an address with a name") from None
        if self.ipam.get(address) != owner:
            self.ipam[address] = owner
            self._changed_addresses.add(address)

    def _reject(self, kv: KeyValue, exc: RecordError) -> None:
        reported = self._rejected.get(kv.key)
        if reported is not None and reported[0] == kv.mod_revision:
            return  # already reported this very version (seen again in a snapshot)
        self._rejected[kv.key] = (kv.mod_revision, exc.reason)
        rejection = Rejection(kv.key, exc.reason, str(exc))
        log.warning("rejected %s (revision %d): %s", kv.key, kv.mod_revision, exc)
        if self._on_reject is not None:
            self._on_reject(rejection)


def _decode_config(raw: bytes) -> MeshConfig:
    try:
        return MeshConfig.from_json(decode_json(raw))
    except RecordError as exc:
        # Counted under its own reason: a bad config is the operator's bug, not a node's.
        raise RecordError(REASON_INVALID_CONFIG, f"mesh config kept as before: {exc}") from None
