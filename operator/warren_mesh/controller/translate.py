"""Kubernetes objects <-> mesh records, as pure functions: what the operator writes and why it refuses.

The CRD schemas already refuse what a structural schema can express; these functions apply the agents' own rules
(trust/records.py) to the rest, so a spec the operator accepts is one every agent accepts, and a refused one is reported
on the object and never written to etcd.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from warren_mesh.mesh.paths import routing_of
from warren_mesh.mesh.usage import DEFAULT_QUOTA, Level
from warren_mesh.mesh.view import Entry, MeshReader
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import ExternalPeer, MeshConfig, NodeRecord
from warren_mesh.values.keyspace import DEFAULT_PREFIX, SCHEMA_VERSION, KeySchema

DEFAULT_MESH = "default"
MESH_LABEL = "mesh.warren.io/mesh"
# On a MeshNode whose node was a Kubernetes Node when it joined: when that Node is gone and so is the registration,
# the node's claims are freed (also when the Node was deleted while no operator ran to see it go).
KUBERNETES_NODE_LABEL = "mesh.warren.io/kubernetes-node"


class SpecError(Exception):
    """A spec the agents would reject; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def mesh_schema(spec: Mapping[str, Any]) -> KeySchema:
    try:
        return KeySchema(str(spec.get("etcdPrefix", DEFAULT_PREFIX)))
    except ValueError as exc:
        raise SpecError("InvalidPrefix", f"etcdPrefix: {exc}") from None


def mesh_config(spec: Mapping[str, Any]) -> MeshConfig:
    """The mesh config a Mesh spec describes, checked exactly as agents check it."""
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION}
    # Dual-stack: the lists, when given, say every network (the primary first); the single fields, which the API
    # server defaults, then do not count.
    dual = {field: spec[field] for field in ("overlayCIDRs", "podCIDRs") if spec.get(field)}
    for field, key in (
        ("overlayCIDRs", "overlay_cidrs"),
        ("podCIDRs", "pod_cidrs"),
        ("overlayCIDR", "overlay_cidr"),
        ("podCIDR", "pod_cidr"),
        ("nodeSubnetPrefixLength", "node_subnet_prefix"),
        ("nodeSubnetPrefixLengthIPv6", "node_subnet_prefix_ipv6"),
        ("listenPort", "listen_port"),
        ("mtu", "mtu"),
        ("persistentKeepalive", "persistent_keepalive"),
        ("leaseTTLSeconds", "lease_ttl_seconds"),
        ("keyRotationIntervalHours", "key_rotation_interval_hours"),
        ("masqueradeIPv4", "masquerade_ipv4"),
        ("masqueradeIPv6", "masquerade_ipv6"),
        ("gateways", "gateways"),
        ("relays", "relays"),
    ):
        if field in spec and f"{field}s" not in dual:
            doc[key] = spec[field]
    try:
        config = MeshConfig.from_json(doc)
    except RecordError as exc:
        message = str(exc)
        for field, key in (
            ("overlayCIDRs", "overlay_cidrs"),
            ("podCIDRs", "pod_cidrs"),
            ("overlayCIDR", "overlay_cidr"),
            ("podCIDR", "pod_cidr"),
            ("nodeSubnetPrefixLengthIPv6", "node_subnet_prefix_ipv6"),
            ("nodeSubnetPrefixLength", "node_subnet_prefix"),
            ("keyRotationIntervalHours", "key_rotation_interval_hours"),
            ("masqueradeIPv4", "masquerade_ipv4"),
            ("masqueradeIPv6", "masquerade_ipv6"),
        ):
            message = message.replace(key, field)
        raise SpecError("InvalidSpec", message) from None
    return config  # written back through to_json(): an MTU given as text ("1400") reaches etcd as a number


@dataclass(frozen=True, slots=True)
class MeshClaim:
    name: str
    prefix: str
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text)


def prefix_owner(prefix: str, claims: Iterable[MeshClaim]) -> str | None:
    """Of the Meshes on ``prefix``, the one that owns it: the oldest (by name on a tie). Two Meshes writing one
    prefix would overwrite each other's config; the later one is refused instead."""
    on_prefix = sorted((c.created, c.name) for c in claims if c.prefix == prefix)
    return on_prefix[0][1] if on_prefix else None


def external_peer(name: str, spec: Mapping[str, Any]) -> ExternalPeer:
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "name": name,
        "public_key": spec.get("publicKey"),
        "allowed_ips": list(spec.get("allowedIPs") or []),
    }
    if spec.get("endpoint"):
        doc["endpoint"] = spec["endpoint"]
    if spec.get("persistentKeepalive") is not None:
        doc["persistent_keepalive"] = spec["persistentKeepalive"]
    try:
        return ExternalPeer.from_json(doc, key_name=name)
    except RecordError as exc:
        raise SpecError("InvalidSpec", str(exc)) from None


def mesh_node_name(mesh: str, node: str) -> str:
    """MeshNode names: the node's own name in the default mesh, ``<mesh>.<node>`` in others."""
    return node if mesh == DEFAULT_MESH else f"{mesh}.{node}"


def mesh_node_spec(mesh: str, record: NodeRecord) -> dict[str, Any]:
    return {
        "mesh": mesh,
        "nodeName": record.name,
        "publicKey": record.public_key,
        "endpoint": str(record.endpoint),
        "endpoints": list(record.endpoint_texts),
        "overlayIP": str(record.overlay_ip),
        "overlayIPs": list(record.overlay_texts),
        "allowedIPs": [str(n) for n in record.allowed_ips],
    } | (
        {"location": record.location, "externalEndpoints": [str(e) for e in record.external_endpoints]}
        if record.location is not None or record.external_endpoints
        else {}
    )


def node_roles(view: MeshReader) -> dict[str, str]:
    """Each node's part in the mesh's topology (docs/topology.md): ``gateway`` of its location, ``relay`` of some
    pair, else absent (a member)."""
    routing = routing_of(view)
    roles = {relay: "relay" for relay in routing.relays.values()}
    roles.update(
        (name, "gateway")
        for name, entry in view.nodes.items()
        if entry.record.location is not None and routing.is_gateway(name)
    )
    return roles


def mesh_node_body(
    mesh: str, entry: Entry[NodeRecord], status: Mapping[str, Any], *, kubernetes_node: bool
) -> dict[str, Any]:
    labels = {MESH_LABEL: mesh, "app.kubernetes.io/managed-by": "warren-mesh-operator"}
    if kubernetes_node:
        labels[KUBERNETES_NODE_LABEL] = "true"
    return {
        "apiVersion": "mesh.warren.io/v1alpha1",
        "kind": "MeshNode",
        "metadata": {"name": mesh_node_name(mesh, entry.record.name), "labels": labels},
        "spec": mesh_node_spec(mesh, entry.record),
        "status": dict(status),
    }


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(
    ok: bool, reason: str, message: str, generation: int | None, previous: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The Ready condition, keeping its lastTransitionTime while its status stays the same."""
    return _condition("Ready", ok, reason, message, generation=generation, previous=previous)


def quota_condition(verdict: tuple[Level, str] | None, previous: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A MeshNode's WithinQuota condition (mesh/usage.py): False with OverSoftQuota or OverHardQuota past one."""
    if verdict is None:
        within = f"within the soft quota of {DEFAULT_QUOTA.soft_keys} keys and {DEFAULT_QUOTA.soft_bytes} bytes"
        return _condition("WithinQuota", True, "WithinQuota", within, generation=None, previous=previous)
    level, why = verdict
    return _condition("WithinQuota", False, f"Over{level.capitalize()}Quota", why, generation=None, previous=previous)


def same_condition(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal but for when they were made."""
    return all(a.get(k) == b.get(k) for k in ("type", "status", "reason", "message"))


def _condition(
    kind: str, ok: bool, reason: str, message: str, *, generation: int | None, previous: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    condition: dict[str, Any] = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now_rfc3339(),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition
