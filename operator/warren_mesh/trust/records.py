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

from warren_mesh.trust.decode import check_schema, int_in, json_object, optional_int
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.fields import (
    parse_allowed_ips,
    parse_mtu,
    parse_overlay,
    validate_name,
    validate_port,
    validate_public_key,
)
from warren_mesh.trust.networks import endpoint_problem
from warren_mesh.trust.reasons import REASON_INVALID_CIDR, REASON_INVALID_FIELD, REASON_NAME_MISMATCH, RecordError
from warren_mesh.trust.text import printable
from warren_mesh.values.keyspace import SCHEMA_VERSION
from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip
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
class MeshConfig:
    """Mesh-wide settings, written by the operator under ``<prefix>/v1/config``; absent means these defaults."""

    overlay_cidr: IPNetwork = field(default_factory=lambda: ipaddress.ip_network(DEFAULT_OVERLAY_CIDR))
    listen_port: int = DEFAULT_LISTEN_PORT
    mtu: int | None = None  # None means auto: the underlay MTU minus WireGuard's overhead
    persistent_keepalive: int = DEFAULT_PERSISTENT_KEEPALIVE  # seconds; 0 turns it off
    lease_ttl_seconds: int = DEFAULT_LEASE_TTL
    # The only network besides its overlay address that a node record may route to itself: its pods' subnet, one
    # of the pod network's subnets of length node_subnet_prefix, which the node claims (claims/<node>/pods/).
    pod_cidr: IPNetwork = field(default_factory=lambda: ipaddress.ip_network(DEFAULT_POD_CIDR))
    node_subnet_prefix: int = DEFAULT_NODE_SUBNET_PREFIX[4]
    key_rotation_interval_hours: int = 0  # every node makes a new WireGuard key this often; 0: never

    def node_subnets(self) -> int:
        """How many node subnets the pod network holds."""
        return 1 << (self.node_subnet_prefix - self.pod_cidr.prefixlen)

    def is_node_subnet(self, network: IPNetwork) -> bool:
        """Whether ``network`` is one of the pod network's node subnets (the right family, length and place)."""
        pods = self.pod_cidr
        if network.version != pods.version or network.prefixlen != self.node_subnet_prefix:
            return False
        return network.subnet_of(pods)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "overlay_cidr": str(self.overlay_cidr),
            "pod_cidr": str(self.pod_cidr),
            "node_subnet_prefix": self.node_subnet_prefix,
            "listen_port": self.listen_port,
            "mtu": "auto" if self.mtu is None else self.mtu,
            "persistent_keepalive": self.persistent_keepalive,
            "lease_ttl_seconds": self.lease_ttl_seconds,
            "key_rotation_interval_hours": self.key_rotation_interval_hours,
        }

    @classmethod
    def from_json(cls, data: object) -> MeshConfig:
        """Fields that are absent take their defaults; fields that are present must be valid."""
        doc = json_object(data, what="mesh config")
        check_schema(doc)
        default = cls()
        cidr = parse_overlay(doc, "overlay_cidr", default.overlay_cidr)
        pods = parse_overlay(doc, "pod_cidr", default.pod_cidr)
        if cidr.version == pods.version and cidr.overlaps(pods):
            raise RecordError(REASON_INVALID_CIDR, f"pod_cidr {pods} overlaps overlay_cidr {cidr}")
        port = validate_port(doc.get("listen_port", default.listen_port), what="listen_port")
        mtu = parse_mtu(doc.get("mtu", "auto"))
        keepalive = int_in(doc, "persistent_keepalive", default.persistent_keepalive, 0, 65535)
        ttl = int_in(doc, "lease_ttl_seconds", default.lease_ttl_seconds, MIN_LEASE_TTL, 3600)
        subnet = int_in(doc, "node_subnet_prefix", DEFAULT_NODE_SUBNET_PREFIX[pods.version], 1, pods.max_prefixlen)
        problem = node_subnet_problem(pods, subnet)
        if problem is not None:
            raise RecordError(REASON_INVALID_CIDR, problem)
        rotation = int_in(doc, "key_rotation_interval_hours", 0, 0, 24 * 366)
        return cls(cidr, port, mtu, keepalive, ttl, pods, subnet, rotation)


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
    endpoint: Endpoint
    overlay_ip: IPAddress
    listen_port: int
    allowed_ips: tuple[IPNetwork, ...] = ()  # networks routed to this node besides its overlay address
    published_at: float = 0.0  # the publisher's wall clock, so convergence lag can be measured
    # The key this node will switch to next (key rotation): peers add it beforehand, with no allowed IPs, so that
    # the node's first handshake with its new key finds them ready (docs/key-rotation.md).
    next_public_key: str | None = None
    # Where this node's WireGuard saw peers whose packets came from elsewhere than their records say (behind NAT):
    # peer name -> endpoint. A node behind NAT learns its public endpoint from these (docs/nat.md).
    observed_endpoints: tuple[tuple[str, Endpoint], ...] = ()
    routes: Routes = field(init=False, repr=False, compare=False)  # overlay address + allowed_ips, derived
    overlay_text: str = field(init=False, repr=False, compare=False)
    endpoint_text: str = field(init=False, repr=False, compare=False)  # str(endpoint), made once per record

    def __post_init__(self) -> None:
        overlay_text = str(self.overlay_ip)
        object.__setattr__(self, "routes", Routes.of(self.allowed_ips, host=self.overlay_ip, host_text=overlay_text))
        object.__setattr__(self, "overlay_text", overlay_text)
        object.__setattr__(self, "endpoint_text", str(self.endpoint))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "public_key": self.public_key,
            "endpoint": str(self.endpoint),
            "overlay_ip": str(self.overlay_ip),
            "allowed_ips": [str(n) for n in self.allowed_ips],
            "listen_port": self.listen_port,
            "published_at": self.published_at,
        } | (
            ({"next_public_key": self.next_public_key} if self.next_public_key is not None else {})
            | (
                {"observed_endpoints": {name: str(ep) for name, ep in self.observed_endpoints}}
                if self.observed_endpoints
                else {}
            )
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
        endpoint = Endpoint.parse(doc.get("endpoint"))
        overlay_text = doc.get("overlay_ip")
        if not isinstance(overlay_text, str) or len(overlay_text) > 45:
            raise RecordError(REASON_INVALID_FIELD, "overlay_ip is missing or not an address")
        try:
            overlay_ip = parse_ip(overlay_text)
        except ValueError:
            raise RecordError(REASON_INVALID_CIDR, f"overlay_ip {printable(overlay_text)} is not an IP") from None
        if endpoint_problem(overlay_ip) is not None or (overlay_ip.version == 6 and overlay_ip.scope_id):
            raise RecordError(REASON_INVALID_CIDR, f"overlay_ip {overlay_ip} is not an address a mesh can use")
        allowed = parse_allowed_ips(doc)
        # The overlay address is routed to the node anyway; listed again, the fold would claim it twice (found by
        # the fuzz test: claimed twice, released twice, a KeyError in the reconciler).
        for network in allowed:
            if network.version == overlay_ip.version and overlay_ip in network:
                raise RecordError(REASON_INVALID_CIDR, f"allowed_ips entry {network} covers the overlay address itself")
        listen_port = validate_port(doc.get("listen_port"), what="listen_port")
        published_at = doc.get("published_at", 0.0)
        if type(published_at) not in (int, float) or not math.isfinite(published_at) or published_at < 0:
            raise RecordError(REASON_INVALID_FIELD, "published_at is not a finite, positive number")
        next_public_key = None
        if doc.get("next_public_key") is not None:
            next_public_key = validate_public_key(doc.get("next_public_key"))
            if next_public_key == public_key:
                raise RecordError(REASON_INVALID_FIELD, "next_public_key is the key in use")
        observed = _observed_endpoints(doc.get("observed_endpoints"))
        return cls(
            name, public_key, endpoint, overlay_ip, listen_port, allowed, float(published_at), next_public_key, observed
        )


MAX_OBSERVED_ENDPOINTS: Final = 256


def _observed_endpoints(value: object) -> tuple[tuple[str, Endpoint], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_OBSERVED_ENDPOINTS:
        raise RecordError(
            REASON_INVALID_FIELD, f"observed_endpoints is not an object of at most {MAX_OBSERVED_ENDPOINTS} entries"
        )
    observed = []
    for name, text in value.items():
        observed.append((validate_name(name), Endpoint.parse(text)))
    return tuple(sorted(observed, key=lambda item: item[0]))


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
