"""The operator's kopf handlers: thin, they validate, report and poke the per-Mesh loops (mesh_sync.py).

Importing this module registers the handlers on kopf's default registry; ``warren-mesh operator`` (cli.py)
configures ``OPERATOR`` and runs kopf. Where a handler must finish before Kubernetes lets go of an object
(deleting a Mesh or a MeshPeer), it writes to etcd itself and a failure is retried by kopf, so the finalizer
holds the object until etcd has forgotten it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from warren_mesh.controller.mesh_sync import MeshSync, delete_keys
from warren_mesh.controller.translate import (
    DEFAULT_MESH,
    MESH_LABEL,
    MeshClaim,
    SpecError,
    external_peer,
    mesh_schema,
    prefix_owner,
    ready_condition,
)
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.kube.client import GROUP, VERSION, Kube
from warren_mesh.store.base import Store, StoreError
from warren_mesh.store.etcd import EtcdStore  # the operator's start-up is the one place that picks a store
from warren_mesh.values.keyspace import DEFAULT_PREFIX, KeySchema

log = logging.getLogger(__name__)
RETRY_DELAY = 3.0  # seconds before kopf retries a handler that could not reach etcd


@dataclass
class OperatorState:
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_tls: EtcdTls | None = None
    store: Store | None = None
    kube: Kube | None = None
    syncs: dict[str, MeshSync] = field(default_factory=dict)

    def clients(self) -> tuple[Store, Kube]:
        if self.store is None or self.kube is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self.store, self.kube


OPERATOR = OperatorState()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: the CRDs' structural schemas would prune it from status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.watching.server_timeout = 60
    OPERATOR.store = EtcdStore(OPERATOR.etcd_endpoints, tls=OPERATOR.etcd_tls)
    OPERATOR.kube = Kube()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if OPERATOR.kube is not None:
        await OPERATOR.kube.close()
    if OPERATOR.store is not None:
        await OPERATOR.store.close()


# --- indexes: what every handler may need to know about the other objects ----------------------------------


@kopf.index(GROUP, VERSION, "meshes")
def mesh_claims(name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict[str, MeshClaim]:
    return {"all": MeshClaim(name, str(spec.get("etcdPrefix", DEFAULT_PREFIX)), str(meta.get("creationTimestamp")))}


@kopf.index(GROUP, VERSION, "meshpeers")
def peers_by_mesh(
    name: str, uid: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
) -> dict[str, tuple[str, str, dict[str, Any]]] | None:
    if meta.get("deletionTimestamp"):
        return None  # being deleted: its finalizer removes the record; the mesh loop must not write it back
    return {str(spec.get("mesh", DEFAULT_MESH)): (name, uid, dict(spec))}


def _claims(index: kopf.Index[str, MeshClaim]) -> list[MeshClaim]:
    return list(index.get("all", []))


def _owned_schema(mesh: str, prefix: str, claims: list[MeshClaim]) -> KeySchema | None:
    """The mesh's key schema if the mesh owns its prefix (else None: it never wrote there)."""
    try:
        schema = mesh_schema({"etcdPrefix": prefix})
    except SpecError:
        return None
    return schema if prefix_owner(schema.prefix, claims) in (mesh, None) else None


# --- Mesh ---------------------------------------------------------------------------------------------------


@kopf.daemon(GROUP, VERSION, "meshes", cancellation_timeout=10)
async def mesh_loop(
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    **kwargs: Any,
) -> None:
    mesh_claims: kopf.Index[str, MeshClaim] = kwargs["mesh_claims"]
    peers_by_mesh: kopf.Index[str, tuple[str, str, dict[str, Any]]] = kwargs["peers_by_mesh"]
    store, kube = OPERATOR.clients()
    sync = MeshSync(
        name=name,
        body=body,
        store=store,
        kube=kube,
        claims=lambda: _claims(mesh_claims),
        peer_specs=lambda: list(peers_by_mesh.get(name, [])),
    )
    OPERATOR.syncs[name] = sync
    try:
        await sync.run(lambda: bool(stopped))
    finally:
        if OPERATOR.syncs.get(name) is sync:
            del OPERATOR.syncs[name]


@kopf.on.update(GROUP, VERSION, "meshes", field="spec")
def mesh_changed(name: str, **_: Any) -> None:
    _wake(name)


@kopf.on.delete(GROUP, VERSION, "meshes")
async def mesh_deleted(name: str, spec: kopf.Spec, **kwargs: Any) -> None:
    """Remove what the operator wrote for this mesh: its config and MeshPeer records in etcd, its MeshNodes.
    Node registrations are the agents' own and stay (agents go on with the default config)."""
    _store, kube = OPERATOR.clients()
    schema = _owned_schema(name, str(spec.get("etcdPrefix", DEFAULT_PREFIX)), _claims(kwargs["mesh_claims"]))
    if schema is not None:
        try:
            await _delete_keys(name, schema.config, prefixes=(schema.peers,), retire=True)
        except StoreError as exc:
            raise kopf.TemporaryError(f"etcd: {exc}", delay=RETRY_DELAY) from None
    for obj in await kube.list("meshnodes", label_selector=f"{MESH_LABEL}={name}"):
        await kube.delete("meshnodes", obj["metadata"]["name"])


async def _delete_keys(
    mesh: str, *keys: str, prefixes: tuple[str, ...] = (), retire: bool = False, deleted_peer: str | None = None
) -> None:
    """Delete in turn with the mesh's loop (if it runs), so no pass in flight writes the keys back."""
    sync = OPERATOR.syncs.get(mesh)
    if sync is not None:
        await sync.delete_keys(*keys, prefixes=prefixes, retire=retire, deleted_peer=deleted_peer)
    else:
        await delete_keys(OPERATOR.clients()[0], keys, prefixes)


def _wake(mesh: str) -> None:
    sync = OPERATOR.syncs.get(mesh)
    if sync is not None:
        sync.wake()


# --- MeshPeer -----------------------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "meshpeers")
@kopf.on.create(GROUP, VERSION, "meshpeers")
@kopf.on.update(GROUP, VERSION, "meshpeers", field="spec")
def meshpeer_changed(
    name: str, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any
) -> None:
    """Validate as the agents would and say so on the object; the mesh's loop writes the record."""
    mesh = str(spec.get("mesh", DEFAULT_MESH))
    try:
        external_peer(name, spec)
    except SpecError as exc:
        ok, reason, message = False, exc.reason, f"not written to etcd: {exc}"
    else:
        ok, reason, message = True, "Accepted", f"every agent of Mesh {mesh} adds this peer"
        if mesh not in OPERATOR.syncs:
            ok, reason, message = False, "MeshNotFound", f"no Mesh named {mesh}; written once it exists"
    previous = status.get("conditions") or []
    patch.status["conditions"] = [ready_condition(ok, reason, message, meta.get("generation"), previous)]
    patch.status["observedGeneration"] = meta.get("generation")
    _wake(mesh)


@kopf.on.delete(GROUP, VERSION, "meshpeers")
async def meshpeer_deleted(name: str, uid: str, spec: kopf.Spec, **kwargs: Any) -> None:
    mesh = str(spec.get("mesh", DEFAULT_MESH))
    claims = _claims(kwargs["mesh_claims"])
    OPERATOR.clients()
    for claim in claims:
        schema = _owned_schema(mesh, claim.prefix, claims) if claim.name == mesh else None
        if schema is not None:
            try:
                await _delete_keys(mesh, schema.peer(name), deleted_peer=uid)
            except StoreError as exc:
                raise kopf.TemporaryError(f"etcd: {exc}", delay=RETRY_DELAY) from None
    _wake(mesh)


# --- Kubernetes Nodes ---------------------------------------------------------------------------------------


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str, name: str, **kwargs: Any) -> None:
    """A deleted Node's registration is revoked in every mesh, so peers drop it now rather than after its lease,
    and its claims (overlay address, pod subnet) are freed for other nodes (the machine is gone; if its agent still
    runs, it registers and claims again)."""
    if type != "DELETED":
        return
    store, _kube = OPERATOR.clients()
    for claim in _claims(kwargs["mesh_claims"]):
        try:
            schema = KeySchema(claim.prefix)
            key = schema.node(name)
        except ValueError:
            continue  # a Mesh with an invalid prefix never had registrations
        for attempt in range(5):
            try:
                kv = await store.get(key)
                if kv is not None:
                    if kv.lease:
                        await store.revoke_lease(kv.lease)
                    await store.delete_if(key, mod_revision=kv.mod_revision)
                    log.info("node %s was deleted from Kubernetes: revoked its registration %s", name, key)
                freed = await store.delete_prefix(schema.claims_of(name))
                if freed:
                    log.info("node %s was deleted from Kubernetes: freed its %d claim(s)", name, freed)
                break
            except StoreError as exc:
                log.warning("could not revoke %s (attempt %d): %s", key, attempt + 1, exc)
                await asyncio.sleep(RETRY_DELAY)
