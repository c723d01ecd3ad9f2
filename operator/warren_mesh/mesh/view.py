"""The mesh as the watch stream has shown it: snapshots and events folded into one validated view.

Each record is decoded once per revision, at the moment it arrives, so the cost of a change is the cost of that
record, not of the mesh. A record that cannot be decoded is rejected alone and reported once; if its key held a
valid record before, that last valid record stays in force until the key is deleted. A node whose record got
mangled is still alive (its lease is being kept), so cutting it off would punish the wrong party. Whatever goes
wrong while one record is handled (even a bug of ours) stays with that record: nothing escapes into the watch.

A mesh config whose networks would leave out nodes that are registered now is refused the same way: the mesh
keeps the config it had (renumbering a live mesh is not something a config edit may do; the operator
refuses such an edit and says so on the Mesh). It takes effect by itself once no registered node is left
outside it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from warren_mesh.mesh.candidacies import GATEWAY_KIND, Candidacies, Candidacy
from warren_mesh.mesh.changes import Changes
from warren_mesh.mesh.claim_slots import ClaimSlots, OwnClaim, Reservation, surplus_message
from warren_mesh.mesh.damping import Damper
from warren_mesh.mesh.rejections import RejectedKeys
from warren_mesh.mesh.renumbering import renumbering_refusal
from warren_mesh.trust.decode import MAX_KEY_BYTES, MAX_VALUE_BYTES, decode_json
from warren_mesh.trust.fields import validate_name
from warren_mesh.trust.reasons import (
    REASON_INVALID_CONFIG,
    REASON_INVALID_FIELD,
    REASON_INVALID_KEY,
    REASON_SURPLUS_CLAIM,
    REASON_TOO_LARGE,
    REASON_UNEXPECTED,
    RecordError,
)
from warren_mesh.trust.records import ExternalPeer, MeshConfig, NodeRecord
from warren_mesh.trust.text import printable
from warren_mesh.values.keyspace import CLAIM_KINDS, KeySchema
from warren_mesh.values.netaddr import network_text, parse_ip, parse_network
from warren_mesh.values.watch import Events, KeyValue, Snapshot, WatchResult

log = logging.getLogger(__name__)

_R = TypeVar("_R", NodeRecord, ExternalPeer)


@dataclass(frozen=True, slots=True)
class Entry(Generic[_R]):
    """A decoded record with the etcd metadata conflict resolution and liveness need."""

    record: _R
    create_revision: int
    mod_revision: int
    lease: int


class MeshReader(Protocol):
    """The view as every part but the observe stage (its one writer) sees it: read only."""

    @property
    def schema(self) -> KeySchema: ...

    @property
    def config(self) -> MeshConfig: ...

    @property
    def nodes(self) -> Mapping[str, Entry[NodeRecord]]: ...

    @property
    def peers(self) -> Mapping[str, Entry[ExternalPeer]]: ...

    @property
    def reservations(self) -> Mapping[str, Reservation]:
        """What claims are on (an overlay address, or a pod subnet with its /prefix) -> who holds it."""
        ...

    @property
    def revision(self) -> int:
        """The etcd revision the view is at."""
        ...

    @property
    def synced(self) -> bool:
        """Whether a complete snapshot has been seen (until then nothing may be removed)."""
        ...

    @property
    def gateway_candidacies(self) -> Mapping[str, Candidacy]:
        """Node -> its candidacy as its location's gateway (mesh/candidacies.py), of the nodes that stand."""
        ...

    def claims_on(self, address: str) -> list[Reservation]: ...

    def surplus_claims(self, owner: str | None = None) -> list[str]: ...

    def rejected_by_reason(self) -> dict[str, int]: ...


class MeshView:
    """Config, node records, external peers and address claims under one key prefix; changed only by ``apply``
    (the agent's observe stage), read by everyone else as a ``MeshReader``."""

    def __init__(self, schema: KeySchema, *, damper: Damper | None = None) -> None:
        """``damper``: hold back updates of a node's record past its rate, the newest winning (mesh/damping.py),
        for whoever then calls ``release_held`` when ``next_release`` says (the agent's observe stage)."""
        self._schema = schema
        self._damper = damper
        self._damped: list[str] = []  # nodes whose updates this batch held back
        self.config = MeshConfig()
        self._config_revision = 0
        self.nodes: dict[str, Entry[NodeRecord]] = {}
        self.peers: dict[str, Entry[ExternalPeer]] = {}
        # What claims are on (an overlay address, or a pod subnet with its /prefix) -> its oldest claim: who holds it.
        self.reservations: dict[str, Reservation] = {}
        # subject -> claim key -> claim: node-owned claims/<node>/overlay/<address> and claims/<node>/pods/<subnet>,
        # and the ipam/<address> reservations of meshes not migrated yet (docs/etcd-keys.md).
        self._claims: dict[str, dict[str, Reservation]] = {}
        # A node holds one claim of each kind and family: of its claims in one slot, only the oldest enters
        # ``_claims``; the younger ones take nothing (reported as surplus, removed by their owner).
        self._slots = ClaimSlots()
        self._candidacies = Candidacies()
        self.revision = 0
        self.synced = False  # a complete snapshot has been seen; until then nothing may be removed
        self._rejected = RejectedKeys()
        # What the batch being applied changed (returned by apply()): the agent decides from the records an event
        # touched, not all of them. Everything, for the first batch.
        self._published: dict[str, float] = {}  # node name -> publish time of the records accepted
        self._changed_everything = True
        self._changed_nodes: set[str] = set()
        self._changed_peers: set[str] = set()
        self._changed_addresses: set[str] = set()
        # The stored config, when refused because it would leave out registered nodes: tried again as they leave.
        self._pending_config: tuple[KeyValue, MeshConfig] | None = None

    def apply(self, result: WatchResult) -> Changes:
        """Fold one watch batch in; what it changed."""
        if isinstance(result, Snapshot):
            self._apply_snapshot(result)
        else:
            self._apply_events(result)
        return self._take_changes()

    def release_held(self) -> Changes:
        """Apply the held node records that are due (``next_release``); what that changed."""
        for kv in self._damper.due() if self._damper is not None else ():
            self._put(kv)
        return self._take_changes()

    def next_release(self) -> float | None:
        """Seconds until a held node record is due (None: none is held)."""
        return self._damper.next_due() if self._damper is not None else None

    def _take_changes(self) -> Changes:
        rejections, cleared = self._rejected.take()
        changes = Changes(
            self._changed_everything,
            self._changed_nodes,
            self._changed_peers,
            self._changed_addresses,
            self._published,
            rejections,
            tuple(self._damped),
            cleared,
        )
        self._changed_everything = False
        self._changed_nodes, self._changed_peers, self._changed_addresses = set(), set(), set()
        self._published = {}
        self._damped = []
        return changes

    @property
    def schema(self) -> KeySchema:
        return self._schema

    def rejected_by_reason(self) -> dict[str, int]:
        """Keys whose current value is rejected, counted by reason (what an operator has to fix now)."""
        return self._rejected.by_reason()

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        present = {kv.key for kv in snapshot.items}
        for name in [n for n in self.nodes if self._schema.node(n) not in present]:
            del self.nodes[name]
        for name in [n for n in self.peers if self._schema.peer(n) not in present]:
            del self.peers[name]
        self.reservations = {}
        self._claims = {}
        self._slots.clear()
        self._candidacies.clear()
        if self._damper is not None:
            self._damper.clear()
        self._rejected.keep_only(present)
        self._pending_config = None
        # The config last: whether it may take effect depends on the nodes registered with it.
        for kv in sorted(snapshot.items, key=lambda kv: kv.key == self._schema.config):
            self._put(kv)
        if self._schema.config not in present:
            self._config_gone()
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
        self._rejected.clear(key)
        kind = self._schema.classify(key)
        if kind is None:
            return
        match kind:
            case ("node", name):
                if self._damper is not None:
                    self._damper.forget(name)
                if self.nodes.pop(name, None) is not None and self._pending_config is not None:
                    self._retry_pending_config()
                self._published.pop(name, None)
                self._changed_nodes.add(name)
            case ("peer", name):
                self.peers.pop(name, None)
                self._changed_peers.add(name)
            case ("claim", _):
                if self._candidacies.drop(key):
                    self._changed_everything = True  # who carries whose traffic: everything may differ
                dropped = self._slots.drop(key)
                if dropped is not None:
                    self._settle_slot(*dropped)
            case ("ipam", address):
                self._drop_claim(address, key)
            case ("config", _):
                self._config_gone()

    def _config_gone(self) -> None:
        """No config in etcd: the defaults, judged like any config. (Deleted under a dual-stack mesh, or one on
        other networks, the defaults would leave every node out: kept as before until no node is.)"""
        gone = KeyValue(self._schema.config, b"", 0, 0)
        try:
            self._put_config(gone, MeshConfig())
        except RecordError as exc:
            self._reject(gone, exc)

    def _put(self, kv: KeyValue) -> None:
        kind = self._schema.classify(kv.key)
        if kind is None:
            return  # a key of a newer schema version or another tool: not ours to judge
        try:
            self._put_kind(kind, kv)
        except RecordError as exc:
            self._reject(kv, exc)
        except Exception as exc:  # a bug of ours must cost one record, never the watch or the agent
            error = RecordError(REASON_UNEXPECTED, f"{type(exc).__name__}: {printable(str(exc))}")
            self._reject(kv, error, trace=exc)
        else:
            self._rejected.clear(kv.key)

    def _put_kind(self, kind: tuple[str, str], kv: KeyValue) -> None:
        kind_name, name = kind
        if len(kv.key) > MAX_KEY_BYTES:
            raise RecordError(REASON_INVALID_KEY, f"key of {len(kv.key)} characters is longer than {MAX_KEY_BYTES}")
        if kv.oversize:
            raise RecordError(REASON_TOO_LARGE, f"value larger than {MAX_VALUE_BYTES} bytes ({kv.oversize} or more)")
        match kind_name:
            case "node":
                _check_key_name(name)
                current = self.nodes.get(name)
                if current is None or current.mod_revision != kv.mod_revision:
                    if current is not None and self._damper is not None and not self._damper.admit(name, kv):
                        self._damped.append(name)
                        return  # held, undecoded: applied when the node's rate allows, unless a newer one replaces it
                    record = NodeRecord.from_json(decode_json(kv.value), key_name=name)
                    self.nodes[name] = Entry(record, kv.create_revision, kv.mod_revision, kv.lease)
                    self._published[name] = record.published_at
                    self._changed_nodes.add(name)
                    if self._pending_config is not None:
                        self._retry_pending_config()
            case "peer":
                _check_key_name(name)
                current_peer = self.peers.get(name)
                if current_peer is None or current_peer.mod_revision != kv.mod_revision:
                    peer = ExternalPeer.from_json(decode_json(kv.value), key_name=name)
                    self.peers[name] = Entry(peer, kv.create_revision, kv.mod_revision, kv.lease)
                    self._changed_peers.add(name)
            case "claim":
                self._put_claim(name, kv)
            case "ipam":
                self._put_legacy_reservation(name, kv)
            case "config":
                if kv.mod_revision != self._config_revision:
                    self._put_config(kv, _decode_config(kv.value))

    def _put_config(self, kv: KeyValue, config: MeshConfig) -> None:
        """Take ``config`` unless it would leave out a registered node; then keep it pending and refuse it."""
        refusal = renumbering_refusal(config, self.nodes, self.config)
        if refusal is not None:
            self._pending_config = (kv, config)
            raise RecordError(REASON_INVALID_CONFIG, f"mesh config kept as before: {refusal}")
        self._pending_config = None
        self.config = config
        self._config_revision = kv.mod_revision
        self._changed_everything = True

    def _retry_pending_config(self) -> None:
        assert self._pending_config is not None
        kv, config = self._pending_config
        try:
            self._put_config(kv, config)
        except RecordError:
            return  # still leaves someone out
        log.info("mesh config of revision %d takes effect: no registered node is left outside it", kv.mod_revision)
        self._rejected.clear(kv.key)

    def _put_claim(self, name: str, kv: KeyValue) -> None:
        claim = self._schema.split_claim(name)
        if claim is None:
            raise RecordError(REASON_INVALID_KEY, f"claim {printable(name)} is not <node>/<kind>/<value>")
        _check_key_name(claim.node)
        if claim.kind == GATEWAY_KIND:
            if self._candidacies.put(kv.key, claim.node, claim.value, kv.create_revision):
                self._changed_everything = True  # who carries whose traffic: everything may differ
            return
        if claim.kind not in CLAIM_KINDS:
            return  # a kind of a newer version: not ours to judge
        subject = self._schema.claim_subject(claim.kind, claim.value)
        try:
            if claim.kind == "pods":
                # Only a subnet's one spelling: the records name it so (str of the network), and claims on one
                # subnet must meet under one subject.
                if network_text(parse_network(subject)) != subject:
                    raise ValueError(subject)
            else:
                parse_ip(subject)
        except ValueError:
            what = "a subnet (ADDRESS-PREFIXLEN)" if claim.kind == "pods" else "an address"
            raise RecordError(REASON_INVALID_KEY, f"claim {printable(name)} does not name {what}") from None
        own = OwnClaim(Reservation(kv.create_revision, kv.key, claim.node), subject, kv.mod_revision)
        holder = self._settle_slot(*self._slots.put(own, claim.kind))
        if holder is not None and holder.claim.key != kv.key:
            raise RecordError(REASON_SURPLUS_CLAIM, surplus_message(kv.key, holder))

    def _settle_slot(self, held: OwnClaim | None, holder: OwnClaim | None) -> OwnClaim | None:
        """After a claim of a slot came or went: the claim that counts now (``held`` counted before) enters the
        claims, and one that no longer counts leaves them and is reported as surplus (only when a snapshot brings
        an older claim after a younger one)."""
        if holder == held:
            return holder
        if held is not None:
            self._drop_claim(held.subject, held.claim.key)
            if holder is not None and held.claim.key != holder.claim.key and self._slots.holds(held.claim.key):
                surplus = RecordError(REASON_SURPLUS_CLAIM, surplus_message(held.claim.key, holder))
                self._rejected.report(held.claim.key, held.mod_revision, surplus)
        if holder is not None:
            self._rejected.clear(holder.claim.key)  # it counts now
            self._add_claim(holder.subject, holder.claim)
        return holder

    def surplus_claims(self, owner: str | None = None) -> list[str]:
        """The keys of ``owner``'s claims (None: every node's) that take nothing, their node holding an older one
        of their kind: to remove."""
        return self._slots.surplus(owner)

    def claim_keys_of(self, owner: str) -> list[str]:
        """The keys of ``owner``'s claims on addresses and subnets, counting or not."""
        return self._slots.keys_of(owner)

    def _put_legacy_reservation(self, address: str, kv: KeyValue) -> None:
        try:
            parse_ip(address)
            owner = validate_name(kv.value.decode())
        except (ValueError, UnicodeDecodeError):
            raise RecordError(
                REASON_INVALID_FIELD, f"reservation {printable(address)} is not an address with a node name"
            ) from None
        self._add_claim(address, Reservation(kv.create_revision, kv.key, owner))

    def _add_claim(self, address: str, claim: Reservation) -> None:
        claims = self._claims.setdefault(address, {})
        if claims.get(claim.key) != claim:
            claims[claim.key] = claim
            self._settle_holder(address)

    def _drop_claim(self, address: str, key: str) -> None:
        claims = self._claims.get(address)
        if claims is not None and claims.pop(key, None) is not None:
            if not claims:
                del self._claims[address]
            self._settle_holder(address)

    def _settle_holder(self, address: str) -> None:
        claims = self._claims.get(address)
        holder = min(claims.values()) if claims else None
        if self.reservations.get(address) != holder:
            if holder is None:
                del self.reservations[address]
            else:
                self.reservations[address] = holder
            self._changed_addresses.add(address)

    @property
    def gateway_candidacies(self) -> Mapping[str, Candidacy]:
        return self._candidacies.by_node

    def claims_on(self, address: str) -> list[Reservation]:
        """Every claim on ``address``, oldest (the holder) first."""
        return sorted(self._claims.get(address, {}).values())

    def _reject(self, kv: KeyValue, exc: RecordError, *, trace: BaseException | None = None) -> None:
        self._rejected.report(kv.key, kv.mod_revision, exc, trace=trace)


def _check_key_name(name: str) -> None:
    try:
        validate_name(name)
    except RecordError:
        raise RecordError(REASON_INVALID_KEY, f"key name {printable(name)} is not a node name") from None


def _decode_config(raw: bytes) -> MeshConfig:
    try:
        return MeshConfig.from_json(decode_json(raw))
    except RecordError as exc:
        # Counted under its own reason: a bad config is the operator's bug, not a node's.
        raise RecordError(REASON_INVALID_CONFIG, f"mesh config kept as before: {exc}") from None
