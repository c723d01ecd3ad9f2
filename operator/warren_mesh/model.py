"""Pure values of the mesh and their JSON codec.

Everything that crosses etcd is decoded here, once, into frozen values, and every way a record can be wrong
maps to one short ``reason`` (the label of ``warren_mesh_rejected_records_total``). Nothing here does I/O, so the
agent, the operator, the CLI and the benchmarks share one definition of what a valid record is.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

_T = TypeVar("_T")

SCHEMA_VERSION: Final = 1

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_OVERLAY_CIDR: Final = "10.96.0.0/16"
DEFAULT_LISTEN_PORT: Final = 51820
DEFAULT_PERSISTENT_KEEPALIVE: Final = 25
DEFAULT_LEASE_TTL: Final = 10
# etcd refuses nothing below this, but its lease expiry runs on ~500 ms ticks and a leader election takes about
# a second: a shorter lease would expire under ordinary jitter.
MIN_LEASE_TTL: Final = 2
# WireGuard's own header overhead is 32 bytes, plus 8 for UDP and 20 (IPv4) or 40 (IPv6) for the outer IP
# header. Using the IPv6 figure always is what the kernel's wg-quick does: it is never too large.
WIREGUARD_OVERHEAD: Final = 80
MIN_MTU: Final = 1280
MAX_MTU: Final = 65535

# Kubernetes node names are DNS-1123 subdomains; etcd keys and metric labels are safe with them as they are.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class RecordError(ValueError):
    """A record that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# The reasons a record is rejected; each is a label value of warren_mesh_rejected_records_total.
REASON_INVALID_JSON: Final = "invalid_json"
REASON_SCHEMA_VERSION: Final = "schema_version"
REASON_INVALID_FIELD: Final = "invalid_field"
REASON_NAME_MISMATCH: Final = "name_mismatch"
REASON_INVALID_PUBLIC_KEY: Final = "invalid_public_key"
REASON_INVALID_ENDPOINT: Final = "invalid_endpoint"
REASON_INVALID_CIDR: Final = "invalid_cidr"
REASON_ADDRESS_OUTSIDE_CIDR: Final = "address_outside_cidr"
REASON_ADDRESS_TAKEN: Final = "address_taken"
REASON_DUPLICATE_PUBLIC_KEY: Final = "duplicate_public_key"
REASON_OVERLAPPING_ALLOWED_IPS: Final = "overlapping_allowed_ips"
REASON_INVALID_CONFIG: Final = "invalid_config"
# Reasons a record that decodes fine is left out because it collides with an earlier one (topology decides).
CONFLICT_REASONS: Final = (
    REASON_ADDRESS_OUTSIDE_CIDR,
    REASON_ADDRESS_TAKEN,
    REASON_DUPLICATE_PUBLIC_KEY,
    REASON_OVERLAPPING_ALLOWED_IPS,
)
# Reasons a record cannot be used at all (the view decides); metrics start every one at 0 so that increase()
# sees the first rejection.
REJECTION_REASONS: Final = (
    REASON_INVALID_JSON,
    REASON_SCHEMA_VERSION,
    REASON_INVALID_FIELD,
    REASON_NAME_MISMATCH,
    REASON_INVALID_PUBLIC_KEY,
    REASON_INVALID_ENDPOINT,
    REASON_INVALID_CIDR,
    REASON_INVALID_CONFIG,
)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RecordError(
            REASON_INVALID_FIELD,
            f"name {name!r} is not a valid node name (lowercase letters, digits, '-' and '.', at most 253)",
        )
    return name


def validate_public_key(value: object) -> str:
    """A WireGuard key is 32 bytes, written as standard base64 (44 characters)."""
    if not isinstance(value, str):
        raise RecordError(REASON_INVALID_PUBLIC_KEY, "public key is not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(REASON_INVALID_PUBLIC_KEY, f"public key {value[:60]!r} is not base64") from None
    if len(raw) != 32:
        raise RecordError(REASON_INVALID_PUBLIC_KEY, f"public key decodes to {len(raw)} bytes, not 32")
    return base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An underlay address WireGuard dials: an IP literal and a UDP port (WireGuard resolves no names)."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None) -> Endpoint:
        """Parse ``IP:PORT`` or ``[IPv6]:PORT``; a bare IP takes ``default_port`` when one is given."""
        if not isinstance(text, str) or not text:
            raise RecordError(REASON_INVALID_ENDPOINT, "endpoint is empty")
        host_text, port_text = text, ""
        if text.startswith("["):
            host_text, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {text!r} is not [IPv6]:PORT")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host_text, _, port_text = text.partition(":")
        try:
            host = parse_ip(host_text)
        except ValueError:
            raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {text!r} does not start with an IP address") from None
        if not port_text:
            if default_port is None:
                raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {text!r} has no port")
            return cls(host, validate_port(default_port, what="endpoint port", reason=REASON_INVALID_ENDPOINT))
        if not port_text.isdigit():
            raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {text!r} has a port that is not a number")
        return cls(host, validate_port(int(port_text), what="endpoint port", reason=REASON_INVALID_ENDPOINT))


def validate_port(value: object, *, what: str, reason: str = REASON_INVALID_FIELD) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RecordError(reason, f"{what} {value!r} is not a port number (1-65535)")
    return value


def parse_network(value: object, *, what: str) -> IPNetwork:
    if not isinstance(value, str):
        raise RecordError(REASON_INVALID_CIDR, f"{what} {value!r} is not a string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise RecordError(REASON_INVALID_CIDR, f"{what} {value!r} is not a network in CIDR form: {exc}") from None


def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address(text)``, IPv4 through the C parser: every node record carries two addresses and its
    reservation a third, and the Python parser was the largest part of decoding a record. glibc's inet_pton
    accepts exactly the dotted quads Python does (no leading zeros, no short forms); anything else, IPv6
    included, goes to the Python parser, which also raises ValueError for invalid text as before."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        return ipaddress.ip_address(text)


def host_network(address: IPAddress) -> IPNetwork:
    """The single-address network (/32 or /128) for one overlay address."""
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


@dataclass(frozen=True, slots=True)
class Routes:
    """The networks routed to one peer, worked out once when its record is decoded: canonical text sorted (what the
    device is given and compared with) and, in the same order, integer ranges (for overlap checks). Deciding runs
    on every change for every peer, so nothing there may build ipaddress objects or strings again."""

    text: tuple[str, ...]
    ranges: tuple[tuple[int, int, int, int], ...]  # (IP version, prefix length, first, last address)

    @classmethod
    def of(
        cls, networks: tuple[IPNetwork, ...], *, host: IPAddress | None = None, host_text: str | None = None
    ) -> Routes:
        """``networks``, and ``host`` as a /32 or /128; the host's is built from the address directly (parsing it
        back as a network text was most of decoding a node record). ``host_text``: ``str(host)``, if at hand."""
        entries = [
            (str(n), (n.version, n.prefixlen, int(n.network_address), int(n.broadcast_address))) for n in networks
        ]
        if host is not None:
            value = int(host)
            text = str(host) if host_text is None else host_text
            entries.append((f"{text}/{host.max_prefixlen}", (host.version, host.max_prefixlen, value, value)))
        entries.sort(key=lambda entry: entry[0])
        return cls(tuple(text for text, _ in entries), tuple(span for _, span in entries))


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Mesh-wide settings, written by the operator under ``<prefix>/v1/config``; absent means these defaults."""

    overlay_cidr: IPNetwork = field(default_factory=lambda: ipaddress.ip_network(DEFAULT_OVERLAY_CIDR))
    listen_port: int = DEFAULT_LISTEN_PORT
    mtu: int | None = None  # None means auto: the underlay MTU minus WireGuard's overhead
    persistent_keepalive: int = DEFAULT_PERSISTENT_KEEPALIVE  # seconds; 0 turns it off
    lease_ttl_seconds: int = DEFAULT_LEASE_TTL

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "overlay_cidr": str(self.overlay_cidr),
            "listen_port": self.listen_port,
            "mtu": "auto" if self.mtu is None else self.mtu,
            "persistent_keepalive": self.persistent_keepalive,
            "lease_ttl_seconds": self.lease_ttl_seconds,
        }

    @classmethod
    def from_json(cls, data: object) -> MeshConfig:
        """Fields that are absent take their defaults; fields that are present must be valid."""
        doc = _object(data, what="mesh config")
        _check_schema(doc)
        default = cls()
        cidr = default.overlay_cidr
        if "overlay_cidr" in doc:
            cidr = parse_network(doc["overlay_cidr"], what="overlay_cidr")
            if cidr.num_addresses < 4:
                raise RecordError(REASON_INVALID_CIDR, f"overlay_cidr {cidr} is too small for a mesh")
        port = validate_port(doc.get("listen_port", default.listen_port), what="listen_port")
        mtu = parse_mtu(doc.get("mtu", "auto"))
        keepalive = _int_in(doc, "persistent_keepalive", default.persistent_keepalive, 0, 65535)
        ttl = _int_in(doc, "lease_ttl_seconds", default.lease_ttl_seconds, MIN_LEASE_TTL, 3600)
        return cls(cidr, port, mtu, keepalive, ttl)


def parse_mtu(value: object) -> int | None:
    """``"auto"`` (None) or a number from 1280 (the IPv6 minimum) to 65535."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_MTU <= value <= MAX_MTU:
        raise RecordError(REASON_INVALID_FIELD, f"mtu {value!r} is neither 'auto' nor a number 1280-65535")
    return value


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
    routes: Routes = field(init=False, repr=False, compare=False)  # overlay address + allowed_ips, derived
    overlay_text: str = field(init=False, repr=False, compare=False)
    endpoint_text: str = field(init=False, repr=False, compare=False)  # str(endpoint), made once per record

    def __post_init__(self) -> None:
        overlay_text = str(self.overlay_ip)
        object.__setattr__(self, "routes", Routes.of(self.allowed_ips, host=self.overlay_ip, host_text=overlay_text))
        object.__setattr__(self, "overlay_text", overlay_text)
        object.__setattr__(self, "endpoint_text", str(self.endpoint))

    def routed_networks(self) -> tuple[IPNetwork, ...]:
        """Everything peers send to this node: its overlay address, then its extra networks."""
        return (host_network(self.overlay_ip), *self.allowed_ips)

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
        }

    @classmethod
    def from_json(cls, data: object, *, key_name: str) -> NodeRecord:
        doc = _object(data, what="node record")
        _check_schema(doc)
        name = validate_name(_required(doc, "name", str))
        if name != key_name:
            raise RecordError(REASON_NAME_MISMATCH, f"record names node {name!r} but sits under {key_name!r}")
        public_key = validate_public_key(doc.get("public_key"))
        endpoint = Endpoint.parse(_required(doc, "endpoint", str))
        try:
            overlay_ip = parse_ip(_required(doc, "overlay_ip", str))
        except ValueError:
            raise RecordError(REASON_INVALID_CIDR, f"overlay_ip {doc['overlay_ip']!r} is not an IP") from None
        allowed = tuple(parse_network(n, what="allowed_ips entry") for n in _list(doc, "allowed_ips"))
        listen_port = validate_port(doc.get("listen_port"), what="listen_port")
        published_at = doc.get("published_at", 0.0)
        if isinstance(published_at, bool) or not isinstance(published_at, int | float):
            raise RecordError(REASON_INVALID_FIELD, "published_at is not a number")
        return cls(name, public_key, endpoint, overlay_ip, listen_port, allowed, float(published_at))


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
        doc = _object(data, what="peer record")
        _check_schema(doc)
        name = validate_name(_required(doc, "name", str))
        if name != key_name:
            raise RecordError(REASON_NAME_MISMATCH, f"record names peer {name!r} but sits under {key_name!r}")
        public_key = validate_public_key(doc.get("public_key"))
        allowed = tuple(parse_network(n, what="allowed_ips entry") for n in _list(doc, "allowed_ips"))
        if not allowed:
            raise RecordError(REASON_INVALID_CIDR, "an external peer needs at least one allowed IP network")
        endpoint = Endpoint.parse(doc["endpoint"]) if doc.get("endpoint") else None
        keepalive = _optional_int(doc, "persistent_keepalive", 0, 65535)
        return cls(name, public_key, allowed, endpoint, keepalive)


def decode_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(REASON_INVALID_JSON, f"value is not JSON: {exc}") from None


def encode_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _object(data: object, *, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(REASON_INVALID_FIELD, f"{what} is not a JSON object")
    return data


def _check_schema(doc: dict[str, Any]) -> None:
    if doc.get("schema") != SCHEMA_VERSION:
        raise RecordError(
            REASON_SCHEMA_VERSION,
            f"schema version {doc.get('schema')!r} is not {SCHEMA_VERSION} (written by another version?)",
        )


def _required(doc: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise RecordError(REASON_INVALID_FIELD, f"{key} is missing or not a {kind.__name__}")
    return value


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise RecordError(REASON_INVALID_FIELD, f"{key} is not a list")
    return value


def _optional_int(doc: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(REASON_INVALID_FIELD, f"{key} {value!r} is not a whole number {low}-{high}")
    return value


def _int_in(doc: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = _optional_int(doc, key, low, high)
    return default if value is None else value
