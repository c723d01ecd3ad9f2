"""The mesh's records (node records, external peers, the mesh config) as validated values, and their JSON codec.

Everything that crosses etcd is decoded here, once, into frozen values, and every way a record can be wrong
maps to one short ``reason`` (the label of ``warren_mesh_rejected_records_total``). Nothing here does I/O, so the
agent, the operator, the CLI and the benchmarks share one definition of what a valid record is.

Every byte read from etcd is hostile: ``trust.decode`` and ``trust.fields`` hold the checks every field passes
before it is used, and ``trust.networks`` what a record may claim.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass, field
from typing import Any, Final

from warren_mesh.trust.decode import bool_of, bounded_list, check_schema, int_in, json_object, optional_int
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.fields import (
    parse_allowed_ips,
    parse_mtu,
    parse_overlay,
    validate_name,
    validate_port,
    validate_public_key,
)
from warren_mesh.trust.networks import usable_host_range
from warren_mesh.trust.node_fields import (
    endpoints_of,
    external_endpoints_of,
    location_of,
    node_names_of,
    observed_endpoints_of,
    overlay_ips_of,
    unreachable_of,
)
from warren_mesh.trust.reasons import (
    REASON_INVALID_CIDR,
    REASON_INVALID_FIELD,
    REASON_NAME_MISMATCH,
    RecordError,
)
from warren_mesh.trust.text import printable
from warren_mesh.values.keyspace import SCHEMA_VERSION
from warren_mesh.values.netaddr import IPAddress, IPNetwork, ip_text
from warren_mesh.values.routes import Routes

DEFAULT_OVERLAY_CIDR: Final = "10.96.0.0/16"
DEFAULT_POD_CIDR: Final = "10.244.0.0/16"
# Each node's pod subnet: a /24 of an IPv4 pod network (254 pods), a /64 of an IPv6 one, unless the config says.
DEFAULT_NODE_SUBNET_PREFIX: Final = {4: 24, 6: 64}
DEFAULT_LISTEN_PORT: Final = 51820
DEFAULT_PERSISTENT_KEEPALIVE: Final = 25
DEFAULT_LEASE_TTL: Final = 10
# etcd refuses nothing below this, but its lease expiry runs on ~500 ms ticks and a leader election takes about
# a second: a shorter lease would expire under ordinary jitter.
MIN_LEASE_TTL: Final = 2


def wireguard_overhead(underlay_version: int) -> int:
    """Bytes WireGuard adds to every packet it carries: 32 of its own (16 of header, a 16-byte tag), 8 of UDP and
    the outer IP header, 20 on an IPv4 underlay and 40 on an IPv6 one. (wg-quick always takes 80: never too large,
    but on the usual IPv4 underlay it gives away 20 bytes of every packet.)"""
    return 32 + 8 + (20 if underlay_version == 4 else 40)


def auto_mtu(underlay_mtu: int, underlay_version: int) -> int:
    """The WireGuard device's MTU for ``mtu: auto``: the largest inner packet whose encrypted packet still fits the
    underlay interface unfragmented (WireGuard pads to 16 bytes only up to the MTU, so this is exact)."""
    return underlay_mtu - wireguard_overhead(underlay_version)


@dataclass(frozen=True, slots=True)
class PodNetwork:
    """One IP family's pod network and the length of the subnet each node claims of it."""

    cidr: IPNetwork
    node_prefix: int

    @property
    def version(self) -> int:
        return self.cidr.version

    def node_subnets(self) -> int:
        """How many node subnets the pod network holds."""
        return 1 << (self.node_prefix - self.cidr.prefixlen)

    def is_node_subnet(self, network: IPNetwork) -> bool:
        """Whether ``network`` is one of its node subnets (the right family, length and place)."""
        if network.version != self.cidr.version or network.prefixlen != self.node_prefix:
            return False
        return network.subnet_of(self.cidr)  # type: ignore[arg-type]


def _default_overlay() -> tuple[IPNetwork, ...]:
    return (ipaddress.ip_network(DEFAULT_OVERLAY_CIDR),)


def _default_pods() -> tuple[PodNetwork, ...]:
    return (PodNetwork(ipaddress.ip_network(DEFAULT_POD_CIDR), DEFAULT_NODE_SUBNET_PREFIX[4]),)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Mesh-wide settings, written by the operator under ``<prefix>/v1/config``; absent means these defaults.

    A mesh has one overlay network per IP family it carries (one, or an IPv4 and an IPv6 one: dual-stack), the
    first being its primary; each node takes one address of each. Likewise one pod network per family, of which
    each node claims one subnet."""

    overlay_cidrs: tuple[IPNetwork, ...] = field(default_factory=_default_overlay)
    listen_port: int = DEFAULT_LISTEN_PORT
    mtu: int | None = None  # None means auto: the underlay MTU minus WireGuard's overhead
    persistent_keepalive: int = DEFAULT_PERSISTENT_KEEPALIVE  # seconds; 0 turns it off
    lease_ttl_seconds: int = DEFAULT_LEASE_TTL
    # The only networks besides its overlay addresses that a node record may route to itself: its pods' subnets,
    # one node subnet of each pod network, which the node claims (claims/<node>/pods/).
    pod_networks: tuple[PodNetwork, ...] = field(default_factory=_default_pods)
    key_rotation_interval_hours: int = 0  # every node makes a new WireGuard key this often; 0: never
    # The IP versions whose pod traffic leaving the cluster is masqueraded behind the node's address (both, as
    # Calico and flannel do; a cluster whose pod addresses are routed outside turns its family off).
    masquerade: tuple[int, ...] = (4, 6)
    # Who may be a location's gateway, and who may relay a pair that cannot talk directly (docs/topology.md):
    # node names, or None for any node that can (a gateway: any with an external endpoint; a relay: any gateway).
    # An empty list of relays turns relaying off.
    gateways: tuple[str, ...] | None = None
    relays: tuple[str, ...] | None = None

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions of the overlay, primary first."""
        return tuple(n.version for n in self.overlay_cidrs)

    def overlay_of(self, version: int) -> IPNetwork | None:
        return next((n for n in self.overlay_cidrs if n.version == version), None)

    def pod_network_of(self, network: IPNetwork) -> PodNetwork | None:
        """The pod network ``network`` is a node subnet of, or None."""
        return next((p for p in self.pod_networks if p.is_node_subnet(network)), None)

    @property
    def pod_cidrs(self) -> tuple[IPNetwork, ...]:
        return tuple(p.cidr for p in self.pod_networks)

    def fits(self, record: NodeRecord) -> bool:
        """Whether ``record``'s addresses, pod subnets and endpoints fit these networks: each address a usable one
        of its family's overlay network, each subnet a node subnet of a pod network, no endpoint inside them. (A
        family the record lacks is no misfit: a mesh that gains one keeps every node.)"""
        for ip in record.overlay_ips:
            overlay = self.overlay_of(ip.version)
            if overlay is None:
                return False
            first, last = usable_host_range(overlay)
            if not first <= int(ip) <= last:
                return False
        if not all(self.pod_network_of(n) is not None for n in record.allowed_ips):
            return False
        networks = (*self.overlay_cidrs, *self.pod_cidrs)
        return not any(e.host.version == n.version and e.host in n for e in record.endpoints for n in networks)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            # The primary networks also under their single-family names, which agents before dual-stack read.
            "overlay_cidr": str(self.overlay_cidrs[0]),
            "pod_cidr": str(self.pod_networks[0].cidr),
            "node_subnet_prefix": self.pod_networks[0].node_prefix,
            "listen_port": self.listen_port,
            "mtu": "auto" if self.mtu is None else self.mtu,
            "persistent_keepalive": self.persistent_keepalive,
            "lease_ttl_seconds": self.lease_ttl_seconds,
            "key_rotation_interval_hours": self.key_rotation_interval_hours,
        }
        doc |= {f"masquerade_ipv{v}": False for v in (4, 6) if v not in self.masquerade}  # absent: on
        if len(self.overlay_cidrs) > 1:
            doc["overlay_cidrs"] = [str(n) for n in self.overlay_cidrs]
        if len(self.pod_networks) > 1:
            doc["pod_cidrs"] = [str(p.cidr) for p in self.pod_networks]
            doc |= {f"node_subnet_prefix_ipv{p.version}": p.node_prefix for p in self.pod_networks}
        doc |= {
            key: list(names)
            for key, names in (("gateways", self.gateways), ("relays", self.relays))
            if names is not None
        }
        return doc

    @classmethod
    def from_json(cls, data: object) -> MeshConfig:
        """Fields that are absent take their defaults; fields that are present must be valid."""
        doc = json_object(data, what="mesh config")
        check_schema(doc)
        default = cls()
        overlays = _networks(doc, "overlay_cidr", default.overlay_cidrs[0])
        cidrs = _networks(doc, "pod_cidr", default.pod_networks[0].cidr)
        pods_name, overlay_name = ("pod_cidrs", "overlay_cidrs") if "pod_cidrs" in doc else ("pod_cidr", "overlay_cidr")
        for pods in cidrs:
            for overlay in overlays:
                if overlay.version == pods.version and overlay.overlaps(pods):
                    raise RecordError(REASON_INVALID_CIDR, f"{pods_name} {pods} overlaps {overlay_name} {overlay}")
        pod_networks = []
        for index, pods in enumerate(cidrs):
            default_prefix = DEFAULT_NODE_SUBNET_PREFIX[pods.version]
            if index == 0:  # the primary's under its single-family name too; the family's name wins
                default_prefix = int_in(doc, "node_subnet_prefix", default_prefix, 1, pods.max_prefixlen)
            key = f"node_subnet_prefix_ipv{pods.version}"
            prefix = int_in(doc, key, default_prefix, 1, pods.max_prefixlen)
            problem = node_subnet_problem(pods, prefix)
            if problem is not None:
                raise RecordError(REASON_INVALID_CIDR, problem)
            pod_networks.append(PodNetwork(pods, prefix))
        port = validate_port(doc.get("listen_port", default.listen_port), what="listen_port")
        mtu = parse_mtu(doc.get("mtu", "auto"))
        keepalive = int_in(doc, "persistent_keepalive", default.persistent_keepalive, 0, 65535)
        ttl = int_in(doc, "lease_ttl_seconds", default.lease_ttl_seconds, MIN_LEASE_TTL, 3600)
        rotation = int_in(doc, "key_rotation_interval_hours", 0, 0, 24 * 366)
        masquerade = tuple(v for v in (4, 6) if bool_of(doc, f"masquerade_ipv{v}", True))
        gateways, relays = (node_names_of(doc, key) for key in ("gateways", "relays"))
        return cls(overlays, port, mtu, keepalive, ttl, tuple(pod_networks), rotation, masquerade, gateways, relays)


def _networks(doc: dict[str, Any], key: str, default: IPNetwork) -> tuple[IPNetwork, ...]:
    """``<key>s`` (one network per IP family, primary first) or else ``<key>`` alone; both given, they agree."""
    single = parse_overlay(doc, key, default)
    if key + "s" not in doc:
        return (single,)
    items = bounded_list(doc, key + "s")
    networks = tuple(parse_overlay({key: item}, key, default) for item in items)
    if not 1 <= len(networks) <= 2 or len({n.version for n in networks}) != len(networks):
        raise RecordError(REASON_INVALID_CIDR, f"{key}s must be one network, or one IPv4 and one IPv6 network")
    if key in doc and single != networks[0]:
        raise RecordError(REASON_INVALID_CIDR, f"{key} {single} is not the first of {key}s ({networks[0]})")
    return networks


def node_subnet_problem(pod_cidr: IPNetwork, prefix: int) -> str | None:
    """Why nodes cannot each get a /``prefix`` of ``pod_cidr``, or None: room for at least two subnets, each with
    room for a gateway and pods (at least 4 addresses)."""
    if prefix <= pod_cidr.prefixlen:
        return f"node_subnet_prefix {prefix} must be longer than the pod network's /{pod_cidr.prefixlen}"
    if prefix > pod_cidr.max_prefixlen - 2:
        return f"node_subnet_prefix {prefix} leaves no room for pods (at most /{pod_cidr.max_prefixlen - 2})"
    return None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One agent's registration, kept under ``<prefix>/v1/nodes/<name>`` on the agent's lease."""

    name: str
    public_key: str
    # Where peers dial it: one endpoint per underlay family it has (IPv4, IPv6 or both), the one it prefers first.
    endpoints: tuple[Endpoint, ...]
    # Its address in each of the mesh's overlay networks, in the mesh's order (the primary family first).
    overlay_ips: tuple[IPAddress, ...]
    listen_port: int
    allowed_ips: tuple[IPNetwork, ...] = ()  # networks routed to this node besides its overlay addresses
    published_at: float = 0.0  # the publisher's wall clock, so convergence lag can be measured
    # The key this node will switch to next (key rotation): peers add it beforehand, with no allowed IPs, so that
    # the node's first handshake with its new key finds them ready (docs/key-rotation.md).
    next_public_key: str | None = None
    # Where this node's WireGuard saw peers whose packets came from elsewhere than their records say (behind NAT):
    # peer name -> endpoint. A node behind NAT learns its public endpoint from these (docs/nat.md).
    observed_endpoints: tuple[tuple[str, Endpoint], ...] = ()
    # Where it is (a zone, a region: docs/topology.md): nodes of one location form a full mesh, and reach the
    # others through their location's gateway. None: the mesh's one unnamed location.
    location: str | None = None
    # Where nodes of other locations dial it (one per family): a node with one may be its location's gateway.
    external_endpoints: tuple[Endpoint, ...] = ()
    # The nodes it should reach directly but cannot (no handshake for a while): a pair that both say so is
    # relayed (docs/topology.md#relays).
    unreachable: tuple[str, ...] = ()
    routes: Routes = field(init=False, repr=False, compare=False)  # overlay addresses + allowed_ips, derived
    overlay_texts: tuple[str, ...] = field(init=False, repr=False, compare=False)
    endpoint_texts: tuple[str, ...] = field(init=False, repr=False, compare=False)  # made once per record

    def __post_init__(self) -> None:
        texts = tuple(ip_text(ip) for ip in self.overlay_ips)
        object.__setattr__(self, "routes", Routes.of(self.allowed_ips, hosts=self.overlay_ips, host_texts=texts))
        object.__setattr__(self, "overlay_texts", texts)
        object.__setattr__(self, "endpoint_texts", tuple(str(e) for e in self.endpoints))

    @property
    def overlay_ip(self) -> IPAddress:
        """Its address in the primary overlay network (what logs and single-family tools name it by)."""
        return self.overlay_ips[0]

    @property
    def endpoint(self) -> Endpoint:
        """Its preferred endpoint."""
        return self.endpoints[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "public_key": self.public_key,
            "endpoint": self.endpoint_texts[0],
            "overlay_ip": self.overlay_texts[0],
            "allowed_ips": [str(n) for n in self.allowed_ips],
            "listen_port": self.listen_port,
            "published_at": self.published_at,
        } | (
            # Dual-stack: every one under the plural names; the single names keep the first, for older readers.
            ({"endpoints": list(self.endpoint_texts)} if len(self.endpoints) > 1 else {})
            | ({"overlay_ips": list(self.overlay_texts)} if len(self.overlay_ips) > 1 else {})
            | ({"next_public_key": self.next_public_key} if self.next_public_key is not None else {})
            | (
                {"observed_endpoints": {name: str(ep) for name, ep in self.observed_endpoints}}
                if self.observed_endpoints
                else {}
            )
            | ({"location": self.location} if self.location is not None else {})
            | ({"external_endpoints": [str(e) for e in self.external_endpoints]} if self.external_endpoints else {})
            | ({"unreachable": list(self.unreachable)} if self.unreachable else {})
        )

    @property
    def public_keys(self) -> tuple[str, ...]:
        """The keys this node's peers configure: its key, and the one it announced it switches to next."""
        return (self.public_key,) if self.next_public_key is None else (self.public_key, self.next_public_key)

    @classmethod
    def from_json(cls, data: object, *, key_name: str) -> NodeRecord:
        doc = json_object(data, what="node record")
        check_schema(doc)
        name = validate_name(doc.get("name"))
        if name != key_name:
            raise RecordError(REASON_NAME_MISMATCH, f"record names node {name!r} but sits under {printable(key_name)}")
        public_key = validate_public_key(doc.get("public_key"))
        endpoints = endpoints_of(doc)
        overlay_ips = overlay_ips_of(doc)
        allowed = parse_allowed_ips(doc)
        # An overlay address is routed to the node anyway; listed again, the fold would claim it twice (found by
        # the fuzz test: claimed twice, released twice, a KeyError in the reconciler).
        for network in allowed:
            for overlay_ip in overlay_ips:
                if network.version == overlay_ip.version and overlay_ip in network:
                    raise RecordError(
                        REASON_INVALID_CIDR, f"allowed_ips entry {network} covers the overlay address {overlay_ip}"
                    )
        listen_port = validate_port(doc.get("listen_port"), what="listen_port")
        published_at = doc.get("published_at", 0.0)
        if type(published_at) not in (int, float) or not math.isfinite(published_at) or published_at < 0:
            raise RecordError(REASON_INVALID_FIELD, "published_at is not a finite, positive number")
        next_public_key = None
        if doc.get("next_public_key") is not None:
            next_public_key = validate_public_key(doc.get("next_public_key"))
            if next_public_key == public_key:
                raise RecordError(REASON_INVALID_FIELD, "next_public_key is the key in use")
        observed = observed_endpoints_of(doc.get("observed_endpoints"))
        return cls(
            name,
            public_key,
            endpoints,
            overlay_ips,
            listen_port,
            allowed,
            float(published_at),
            next_public_key,
            observed,
            location_of(doc),
            external_endpoints_of(doc),
            unreachable_of(doc.get("unreachable")),
        )


@dataclass(frozen=True, slots=True)
class ExternalPeer:
    """A WireGuard peer outside the cluster (a MeshPeer), kept under ``<prefix>/v1/peers/<name>``."""

    name: str
    public_key: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None  # None: the mesh's setting
    routes: Routes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes", Routes.of(self.allowed_ips))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "public_key": self.public_key,
            "allowed_ips": [str(n) for n in self.allowed_ips],
        }
        if self.endpoint is not None:
            doc["endpoint"] = str(self.endpoint)
        if self.persistent_keepalive is not None:
            doc["persistent_keepalive"] = self.persistent_keepalive
        return doc

    @classmethod
    def from_json(cls, data: object, *, key_name: str) -> ExternalPeer:
        doc = json_object(data, what="peer record")
        check_schema(doc)
        name = validate_name(doc.get("name"))
        if name != key_name:
            raise RecordError(REASON_NAME_MISMATCH, f"record names peer {name!r} but sits under {printable(key_name)}")
        public_key = validate_public_key(doc.get("public_key"))
        allowed = parse_allowed_ips(doc)
        if not allowed:
            raise RecordError(REASON_INVALID_CIDR, "an external peer needs at least one allowed IP network")
        endpoint_text = doc.get("endpoint")
        endpoint = None if endpoint_text in (None, "") else Endpoint.parse(endpoint_text)
        keepalive = optional_int(doc, "persistent_keepalive", 0, 65535)
        return cls(name, public_key, allowed, endpoint, keepalive)


def encode_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
