"""One Mesh's reconciliation loop: Kubernetes -> etcd (config, MeshPeers) and etcd -> Kubernetes (MeshNodes,
Mesh status).

Level-triggered: every pass compares the whole desired state with etcd and Kubernetes and writes only what
differs, so an operator restart, an etcd outage or an API server restart is caught up by the next pass without
help. A pass runs when etcd changes (a watch on the mesh's prefix), when a handler pokes it (a Mesh or MeshPeer
edit), and every few seconds otherwise. It is the only writer of the mesh's keys and MeshNodes, so passes
never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from warren_mesh.controller.translate import (
    KUBERNETES_NODE_LABEL,
    MESH_LABEL,
    MeshClaim,
    SpecError,
    external_peer,
    mesh_config,
    mesh_node_body,
    mesh_node_name,
    mesh_node_spec,
    mesh_schema,
    node_roles,
    now_rfc3339,
    prefix_owner,
    quota_condition,
    ready_condition,
    same_condition,
)
from warren_mesh.kube.client import Kube, KubeError
from warren_mesh.mesh.renumbering import renumbering_refusal
from warren_mesh.mesh.usage import DEFAULT_QUOTA, Level, NodeUsage
from warren_mesh.mesh.view import MeshReader, MeshView
from warren_mesh.store.base import Store, StoreError
from warren_mesh.trust.node_fields import validate_location
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import encode_json
from warren_mesh.values.keyspace import KeySchema

log = logging.getLogger(__name__)

PASS_INTERVAL = 5.0  # seconds between passes when nothing pokes the loop
# Seconds between listings of the Nodes for their topology labels (every Node, however many: not every pass).
LOCATION_REFRESH = 15.0
# How long a node's surplus claims (younger ones of a kind it holds already) are left to their owner, whose agent
# removes them as soon as its watch shows them, before the operator does: a node whose credential is used by
# someone else while its agent is down, or by no agent at all, must not keep its surplus for ever.
SURPLUS_GRACE = 2 * PASS_INTERVAL
LEASE_REFRESH = 15.0  # seconds between updates of MeshNodes' leaseSecondsLeft/lastSeen (each is an API write)


async def delete_keys(store: Store, keys: Iterable[str], prefixes: Iterable[str] = ()) -> None:
    for key in keys:
        await store.delete(key)
    for prefix in prefixes:
        await store.delete_prefix(prefix)


class MeshSync:
    def __init__(
        self,
        *,
        name: str,
        body: Mapping[str, Any],
        store: Store,
        kube: Kube,
        claims: Callable[[], Iterable[MeshClaim]],
        peer_specs: Callable[[], Iterable[tuple[str, str, Mapping[str, Any]]]],
    ) -> None:
        """``body`` is the Mesh as kopf keeps it current; ``claims`` every Mesh's prefix claim; ``peer_specs``
        (name, uid, spec) of the MeshPeers that name this mesh."""
        self.name = name
        self._body = body
        self._store = store
        self._kube = kube
        self._claims = claims
        self._peer_specs = peer_specs
        self._wake = asyncio.Event()
        self._view: MeshView | None = None
        self._usage: NodeUsage | None = None  # what each node holds under its own keys, with the view
        self._surplus_seen: dict[str, float] = {}  # surplus claim key -> when a pass first saw it
        self._observer: asyncio.Task[None] | None = None
        self._lease_refreshed = 0.0
        self._locations_label: object = None  # the Mesh's topologyLabel at the last listing of the Nodes
        self._locations_listed = -LOCATION_REFRESH  # loop time of that listing
        # Passes and the deletion handlers' etcd writes take turns: a pass that read the MeshPeers just before
        # one was deleted must not write its record back after the handler removed it.
        self._turn = asyncio.Lock()
        self._retired = False
        # MeshPeers whose deletion handler removed their record: kopf's index may list them a little longer.
        self._deleted_peers: set[str] = set()

    def wake(self) -> None:
        self._wake.set()

    async def delete_keys(
        self, *keys: str, prefixes: tuple[str, ...] = (), retire: bool = False, deleted_peer: str | None = None
    ) -> None:
        """Delete etcd keys between passes; ``retire``: the Mesh is going away, run no pass after this;
        ``deleted_peer``: the uid of the MeshPeer whose record this is, never to be written again."""
        async with self._turn:
            if deleted_peer is not None:
                self._deleted_peers.add(deleted_peer)
            await delete_keys(self._store, keys, prefixes)
            self._retired = self._retired or retire

    async def run(self, stopped: Callable[[], bool]) -> None:
        try:
            while not stopped() and not self._retired:
                self._wake.clear()
                try:
                    async with self._turn:
                        if self._retired:
                            break
                        await self.sync_once()
                except (StoreError, KubeError, OSError) as exc:
                    log.warning("mesh %s: pass failed, retrying: %s", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PASS_INTERVAL):
                        await self._wake.wait()
        finally:
            await self._stop_observer()

    # --- one pass ---------------------------------------------------------------------------------------------

    async def sync_once(self) -> None:
        spec = self._body.get("spec") or {}
        generation = self._body.get("metadata", {}).get("generation")
        try:
            config = mesh_config(spec)
            schema = mesh_schema(spec)
            owner = prefix_owner(schema.prefix, self._claims())
            if owner is not None and owner != self.name:
                raise SpecError("PrefixTaken", f"etcd prefix {schema.prefix} belongs to Mesh {owner}")
        except SpecError as exc:
            # Refused: nothing is written to etcd; what was written before stays, so agents keep working.
            await self._patch_status({"conditions": [self._ready(False, exc.reason, str(exc), generation)]})
            return
        view = await self._observe(schema)

        want = encode_json(config.to_json())
        current = await self._store.get(schema.config)
        # Agents refuse a config that would leave registered nodes out; so does the operator, before writing it.
        renumbering = renumbering_refusal(config, view.nodes, view.config)
        if renumbering is None and (current is None or current.value != want):
            await self._store.put(schema.config, want)
            log.info("mesh %s: wrote config to %s: %s", self.name, schema.config, config.to_json())
        written, refused = await self._sync_peers(schema)
        nodes, ready = await self._sync_mesh_nodes(view)
        await self._remove_surplus_claims(view)
        await self._sync_locations(schema, spec.get("topologyLabel"))

        if renumbering is not None:
            condition = self._ready(False, "OverlayCIDRInUse", f"config not written: {renumbering}", generation)
        else:
            message = f"config in etcd under {schema.prefix}; {written} MeshPeer(s) written"
            if refused:
                message += f"; refused: {', '.join(refused)}"
            condition = self._ready(True, "Applied", message, generation)
        over_quota = [
            {"node": node, "level": level, "message": why} for node, (level, why) in sorted(self._over_quota().items())
        ]
        await self._patch_status(
            {"nodes": nodes, "readyNodes": ready, "overQuota": over_quota, "conditions": [condition]}
        )

    async def _sync_peers(self, schema: KeySchema) -> tuple[int, list[str]]:
        """Make ``<prefix>/v1/peers/`` hold exactly the valid MeshPeers of this mesh (the operator owns it)."""
        desired: dict[str, bytes] = {}
        refused = []
        listed = sorted(self._peer_specs())
        self._deleted_peers &= {uid for _, uid, _ in listed}  # forget uids once kopf has forgotten them too
        for peer_name, uid, spec in listed:
            if uid in self._deleted_peers:
                continue
            try:
                desired[schema.peer(peer_name)] = encode_json(external_peer(peer_name, spec).to_json())
            except SpecError:
                refused.append(peer_name)  # its own handler reports why on the MeshPeer
        present = {kv.key: kv.value for kv in (await self._store.list_prefix(schema.peers)).items}
        for key, value in desired.items():
            if present.get(key) != value:
                await self._store.put(key, value)
                log.info("mesh %s: wrote peer %s", self.name, key)
        for key in present.keys() - desired.keys():
            await self._store.delete(key)
            log.info("mesh %s: removed peer %s (its MeshPeer is gone)", self.name, key)
        return len(desired), refused

    async def _sync_mesh_nodes(self, view: MeshReader) -> tuple[int, int]:
        """Mirror the registrations as MeshNodes; returns (registered, with a live lease)."""
        if not view.synced:
            return 0, 0
        loop = asyncio.get_running_loop()
        refresh = loop.time() - self._lease_refreshed >= LEASE_REFRESH
        entries = dict(view.nodes)
        leases = sorted({e.lease for e in entries.values() if e.lease})
        left_list = await asyncio.gather(*(self._store.lease_time_left(lease) for lease in leases))
        left = dict(zip(leases, left_list, strict=True))
        existing = {
            obj["metadata"]["name"]: obj
            for obj in await self._kube.list("meshnodes", label_selector=f"{MESH_LABEL}={self.name}")
        }
        seen = now_rfc3339()
        over_quota = self._over_quota()
        roles = node_roles(view)
        for node, entry in entries.items():
            object_name = mesh_node_name(self.name, node)
            obj = existing.get(object_name)
            previous = ((obj or {}).get("status") or {}).get("conditions") or []
            quota = quota_condition(over_quota.get(node), previous)
            status = {
                "leaseSecondsLeft": left.get(entry.lease, -1),
                "lastSeen": seen,
                "conditions": [quota],
                "role": roles.get(node, "member"),
            }
            if obj is None:
                is_node = await self._kube.get_core(f"nodes/{node}") is not None
                await self._kube.create("meshnodes", mesh_node_body(self.name, entry, status, kubernetes_node=is_node))
                await self._kube.patch("meshnodes", object_name, {"status": status}, status=True)
            else:
                if obj.get("spec") != mesh_node_spec(self.name, entry.record):
                    await self._kube.patch("meshnodes", object_name, {"spec": mesh_node_spec(self.name, entry.record)})
                quota_changed = not any(same_condition(quota, c) for c in previous)
                role_changed = (obj.get("status") or {}).get("role") != status["role"]
                if refresh or quota_changed or role_changed or not obj.get("status"):
                    await self._kube.patch("meshnodes", object_name, {"status": status}, status=True)
        wanted = {mesh_node_name(self.name, node) for node in entries}
        for object_name in existing.keys() - wanted:
            await self._release_deleted_node(existing[object_name], view.schema)
            await self._kube.delete("meshnodes", object_name)
            log.info("mesh %s: node %s left the mesh", self.name, object_name)
        if refresh:
            self._lease_refreshed = loop.time()
        ready = sum(1 for e in entries.values() if not e.lease or left.get(e.lease, -1) > 0)
        return len(entries), ready

    async def _sync_locations(self, schema: KeySchema, label: object) -> None:
        """Make ``locations/`` say each Kubernetes Node's value of the Mesh's ``topologyLabel`` (none without one):
        each node's agent publishes its own as its location (docs/topology.md). A value that is no location (the
        label's syntax is wider) is left out and said."""
        now = asyncio.get_running_loop().time()
        if label == self._locations_label and now - self._locations_listed < LOCATION_REFRESH:
            return
        self._locations_label, self._locations_listed = label, now
        desired: dict[str, bytes] = {}
        if isinstance(label, str) and label:
            found = await self._kube.get_core("nodes")
            for node in (found or {}).get("items", []):
                name = node["metadata"]["name"]
                value = ((node["metadata"].get("labels") or {}).get(label)) or ""
                try:
                    desired[name] = validate_location(value).encode() if value else b""
                except RecordError as exc:
                    log.warning("mesh %s: node %s: %s %s", self.name, name, label, exc)
            desired = {name: value for name, value in desired.items() if value}
        current = {kv.key: kv.value for kv in (await self._store.list_prefix(schema.locations)).items}
        for name, value in desired.items():
            if current.get(schema.location(name)) != value:
                await self._store.put(schema.location(name), value)
                log.info("mesh %s: node %s is in location %s (%s)", self.name, name, value.decode(), label)
        stale = current.keys() - {schema.location(name) for name in desired}
        for key in sorted(stale):
            await self._store.delete(key)

    def _over_quota(self) -> dict[str, tuple[Level, str]]:
        """Nodes past their soft or hard quota (the enroller suspends those past the hard one)."""
        return self._usage.over(DEFAULT_QUOTA) if self._usage is not None else {}

    async def _remove_surplus_claims(self, view: MeshReader) -> None:
        """Delete the surplus claims their owners have left for ``SURPLUS_GRACE`` (they take nothing, but each is
        a key in etcd: one node writing thousands of them is a load on every watcher)."""
        if not view.synced:
            return
        now = asyncio.get_running_loop().time()
        surplus = view.surplus_claims()
        self._surplus_seen = {key: self._surplus_seen.get(key, now) for key in surplus}
        due = [key for key, seen in self._surplus_seen.items() if now - seen >= SURPLUS_GRACE]
        for key in due:
            await self._store.delete(key)
        if due:
            log.warning(
                "mesh %s: removed %d surplus claim(s) their nodes left (first: %s)", self.name, len(due), due[0]
            )

    async def _release_deleted_node(self, mesh_node: Mapping[str, Any], schema: KeySchema) -> None:
        """A Kubernetes node that left the mesh and whose Node object is gone: its machine is gone, so its claims
        (overlay address, pod subnet) are freed. The Node watch does this at once; this catches a Node deleted while
        no operator ran (it may have run on that very node)."""
        if mesh_node.get("metadata", {}).get("labels", {}).get(KUBERNETES_NODE_LABEL) != "true":
            return  # not a Kubernetes node (a node outside the cluster): it keeps its claims while it is away
        node = mesh_node.get("spec", {}).get("nodeName")
        if not node or await self._kube.get_core(f"nodes/{node}") is not None:
            return
        freed = await self._store.delete_prefix(schema.claims_of(node))
        if freed:
            log.info("mesh %s: node %s is gone from Kubernetes: freed its %d claim(s)", self.name, node, freed)

    # --- helpers ----------------------------------------------------------------------------------------------

    def _ready(self, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
        previous = (self._body.get("status") or {}).get("conditions") or []
        return ready_condition(ok, reason, message, generation, previous)

    async def _patch_status(self, status: dict[str, Any]) -> None:
        status["observedGeneration"] = self._body.get("metadata", {}).get("generation")
        current = self._body.get("status") or {}
        if all(current.get(k) == v for k, v in status.items()):
            return  # unchanged: no write, no event
        await self._kube.patch("meshes", self.name, {"status": status}, status=True)

    async def _observe(self, schema: KeySchema) -> MeshView:
        """The mesh as etcd holds it, kept current by a watch on its prefix (restarted if the prefix changes)."""
        if self._view is not None and self._view.schema == schema and self._observer is not None:
            return self._view
        await self._stop_observer()
        view = MeshView(schema)
        usage = NodeUsage(schema)
        self._view, self._usage = view, usage
        synced = asyncio.Event()

        async def follow() -> None:
            async for result in self._store.observe(schema.root):
                view.apply(result)
                usage.apply(result)
                synced.set()
                self.wake()

        self._observer = asyncio.get_running_loop().create_task(follow(), name=f"observe-{self.name}")
        async with asyncio.timeout(10):  # etcd away: the pass fails and the next one waits again
            await synced.wait()
        return view

    async def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._observer
            self._observer = None
