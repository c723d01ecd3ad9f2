"""Pure values of the mesh and their JSON codec.

Everything that crosses etcd is decoded here, once, into frozen values, and every way a record can be wrong
maps to one short ``reason`` (the label of ``warren_mesh_rejected_records_total``). Nothing here does I/O, so the
agent, the operator, the CLI and the benchmarks share one definition of what a valid record is.

Every byte read from etcd is hostile until proven otherwise: values are bounded in size and nesting before they
are parsed, numbers must be JSON numbers of the right type and range (text is parsed only where it must be, and
then as ASCII), and every field is checked before it is used. What a record may *claim* (networks, endpoints)
is ``admission``'s to say.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from warren_mesh.admission import endpoint_problem, network_problem, overlay_problem
from warren_mesh.netaddr import IPAddress, IPNetwork, parse_ip

__all__ = ["IPAddress", "IPNetwork", "parse_ip"]  # re-exported: most callers know them from here

_T = TypeVar("_T")

SCHEMA_VERSION: Final = 1

DEFAULT_OVERLAY_CIDR: Final = "10.96.0.0/16"
DEFAULT_POD_CIDR: Final = "10.244.0.0/16"
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

# Bounds on what a record may be before it is parsed at all. A node record is ~300 bytes and an external peer
# with every network it may route a few kB; nothing of ours nests deeper than an object holding a list.
MAX_VALUE_BYTES: Final = 16 * 1024
MAX_KEY_BYTES: Final = 512
MAX_NESTING: Final = 4
MAX_ALLOWED_IPS: Final = 64

# Kubernetes node names are DNS-1123 subdomains; etcd keys and metric labels are safe with them as they are.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ASCII_DIGITS = re.compile(r"^[0-9]{1,5}$")


class RecordError(ValueError):
    """A record that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# The reasons a record is rejected; each is a label value of warren_mesh_rejected_records_total.
REASON_INVALID_JSON: Final = "invalid_json"
REASON_TOO_LARGE: Final = "too_large"
REASON_INVALID_KEY: Final = "invalid_key"
REASON_SCHEMA_VERSION: Final = "schema_version"
REASON_INVALID_FIELD: Final = "invalid_field"
REASON_NAME_MISMATCH: Final = "name_mismatch"
REASON_INVALID_PUBLIC_KEY: Final = "invalid_public_key"
REASON_INVALID_ENDPOINT: Final = "invalid_endpoint"
REASON_INVALID_CIDR: Final = "invalid_cidr"
REASON_FORBIDDEN_NETWORK: Final = "forbidden_network"
REASON_INVALID_CONFIG: Final = "invalid_config"
REASON_UNEXPECTED: Final = "unexpected_error"  # a bug of ours, contained to the record that hit it
# Reasons a record that decodes fine is left out because of what it claims next to the config, the reservations
# and the records before it (topology decides).
REASON_ADDRESS_OUTSIDE_CIDR: Final = "address_outside_cidr"
REASON_ADDRESS_TAKEN: Final = "address_taken"
REASON_DUPLICATE_PUBLIC_KEY: Final = "duplicate_public_key"
REASON_OVERLAPPING_ALLOWED_IPS: Final = "overlapping_allowed_ips"
REASON_NETWORK_NOT_OWNED: Final = "network_not_owned"  # a network the mesh never gave this record
REASON_UNSAFE_ROUTE: Final = "unsafe_route"  # would route this node's underlay or etcd into the tunnel
CONFLICT_REASONS: Final = (
    REASON_ADDRESS_OUTSIDE_CIDR,
    REASON_ADDRESS_TAKEN,
    REASON_DUPLICATE_PUBLIC_KEY,
    REASON_OVERLAPPING_ALLOWED_IPS,
    REASON_NETWORK_NOT_OWNED,
    REASON_UNSAFE_ROUTE,
)
# Reasons a record cannot be used at all (the view decides); metrics start every one at 0 so that increase()
# sees the first rejection.
REJECTION_REASONS: Final = (
    REASON_INVALID_JSON,
    REASON_TOO_LARGE,
    REASON_INVALID_KEY,
    REASON_SCHEMA_VERSION,
    REASON_INVALID_FIELD,
    REASON_NAME_MISMATCH,
    REASON_INVALID_PUBLIC_KEY,
    REASON_INVALID_ENDPOINT,
    REASON_INVALID_CIDR,
    REASON_FORBIDDEN_NETWORK,
    REASON_INVALID_CONFIG,
    REASON_UNEXPECTED,
)

# Curve25519 points of small order, as listed by libsodium (the top bit, which X25519 ignores, cleared). A peer
# with one of these as its public key makes every handshake's shared secret predictable (all zeros).
LOW_ORDER_POINTS: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def printable(text: str | bytes, limit: int = 80) -> str:
    """``text`` quoted for a log line or an error message: escaped, and cut to ``limit`` characters (a 1 MB record
    must not make a 1 MB log line, nor a control character a fake one)."""
    shown = ascii(text[:limit])
    return shown + f"... ({len(text)} in all)" if len(text) > limit else shown


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one bounded line of ASCII, unquoted (messages that may carry parts of a record)."""
    shown = ascii(text[:limit])[1:-1]
    return shown + f"... ({len(text)} characters in all)" if len(text) > limit else shown


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        shown = printable(name) if isinstance(name, str) else type(name).__name__
        raise RecordError(
            REASON_INVALID_FIELD,
            f"name {shown} is not a valid node name (lowercase letters, digits, '-' and '.', at most 253)",
        )
    return name


def validate_public_key(value: object) -> str:
    """A WireGuard key is 32 bytes, written as standard base64 (44 characters), and not a point of small order."""
    if not isinstance(value, str):
        raise RecordError(REASON_INVALID_PUBLIC_KEY, "public key is not a string")
    if len(value) != 44:
        raise RecordError(REASON_INVALID_PUBLIC_KEY, f"public key {printable(value)} is not 44 base64 characters")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(REASON_INVALID_PUBLIC_KEY, f"public key {printable(value)} is not base64") from None
    if len(raw) != 32:
        raise RecordError(REASON_INVALID_PUBLIC_KEY, f"public key decodes to {len(raw)} bytes, not 32")
    if raw[:31] + bytes([raw[31] & 0x7F]) in LOW_ORDER_POINTS:
        raise RecordError(REASON_INVALID_PUBLIC_KEY, f"public key {value} is a Curve25519 point of small order")
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
    def parse(cls, text: object, *, default_port: int | None = None) -> Endpoint:
        """Parse ``IP:PORT`` or ``[IPv6]:PORT`` of a remote peer; a bare IP takes ``default_port`` when one is
        given. Addresses no remote peer can have (loopback, multicast, link-local, ...) are refused."""
        host, port = split_host_port(text)
        if port is None:
            if default_port is None:
                raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(str(text))} has no port")
            port = default_port
        problem = endpoint_problem(host)
        if problem is not None:
            raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(str(text))}: {problem}")
        return cls(host, validate_port(port, what="endpoint port", reason=REASON_INVALID_ENDPOINT))


def split_host_port(text: object) -> tuple[IPAddress, int | None]:
    """``IP``, ``IP:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` as an address and a port (None when absent)."""
    if not isinstance(text, str) or not text:
        raise RecordError(REASON_INVALID_ENDPOINT, "endpoint is empty or not a string")
    if len(text) > 64:
        raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(text)} is too long for an address")
    host_text, port_text = text, None
    if text.startswith("["):
        host_text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(text)} is not [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host_text, _, port_text = text.partition(":")
    try:
        host = parse_ip(host_text)
    except ValueError:
        raise RecordError(
            REASON_INVALID_ENDPOINT, f"endpoint {printable(text)} does not start with an IP address"
        ) from None
    if port_text is None:
        return host, None
    if not _ASCII_DIGITS.match(port_text):
        raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(text)} has a port that is not a number")
    return host, int(port_text)


def validate_port(value: object, *, what: str, reason: str = REASON_INVALID_FIELD) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise RecordError(reason, f"{what} {_shown(value)} is not a port number (1-65535)")
    return value


def parse_network(value: object, *, what: str) -> IPNetwork:
    if not isinstance(value, str):
        raise RecordError(REASON_INVALID_CIDR, f"{what} {_shown(value)} is not a string")
    if len(value) > 64:
        raise RecordError(REASON_INVALID_CIDR, f"{what} {printable(value)} is too long for a network")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise RecordError(
            REASON_INVALID_CIDR, f"{what} {printable(value)} is not a network in CIDR form: {exc}"
        ) from None


def parse_routed_network(value: object, *, what: str) -> IPNetwork:
    """A network a record asks to have routed to it: valid, and not one the mesh may ever route."""
    network = parse_network(value, what=what)
    problem = network_problem(network)
    if problem is not None:
        raise RecordError(REASON_FORBIDDEN_NETWORK, f"{what}: {problem}")
    return network


def parse_allowed_ips(doc: dict[str, Any]) -> tuple[IPNetwork, ...]:
    """A record's ``allowed_ips``: each one routable, and no two overlapping (the fold keeps one claim per
    network, and a network listed twice would be claimed twice and released twice)."""
    networks = tuple(parse_routed_network(n, what="allowed_ips entry") for n in _list(doc, "allowed_ips"))
    spans = sorted((n.version, int(n.network_address), int(n.broadcast_address), n) for n in networks)
    for (version, _, last, network), (next_version, next_first, _, following) in itertools.pairwise(spans):
        if version == next_version and next_first <= last:
            raise RecordError(REASON_INVALID_CIDR, f"allowed_ips entries {network} and {following} overlap")
    return networks


def _parse_overlay(doc: dict[str, Any], key: str, default: IPNetwork) -> IPNetwork:
    if key not in doc:
        return default
    network = parse_network(doc[key], what=key)
    problem = overlay_problem(network)
    if problem is not None:
        raise RecordError(REASON_INVALID_CIDR, f"{key}: {problem}")
    return network


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
    # The only network besides its overlay address that a node record may route to itself (its pods').
    pod_cidr: IPNetwork = field(default_factory=lambda: ipaddress.ip_network(DEFAULT_POD_CIDR))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "overlay_cidr": str(self.overlay_cidr),
            "pod_cidr": str(self.pod_cidr),
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
        cidr = _parse_overlay(doc, "overlay_cidr", default.overlay_cidr)
        pods = _parse_overlay(doc, "pod_cidr", default.pod_cidr)
        if cidr.version == pods.version and cidr.overlaps(pods):
            raise RecordError(REASON_INVALID_CIDR, f"pod_cidr {pods} overlaps overlay_cidr {cidr}")
        port = validate_port(doc.get("listen_port", default.listen_port), what="listen_port")
        mtu = parse_mtu(doc.get("mtu", "auto"))
        keepalive = _int_in(doc, "persistent_keepalive", default.persistent_keepalive, 0, 65535)
        ttl = _int_in(doc, "lease_ttl_seconds", default.lease_ttl_seconds, MIN_LEASE_TTL, 3600)
        return cls(cidr, port, mtu, keepalive, ttl, pods)


def parse_mtu(value: object) -> int | None:
    """``"auto"`` (None) or a number from 1280 (the IPv6 minimum) to 65535, as a JSON number or ASCII digits."""
    if value == "auto":
        return None
    if isinstance(value, str) and _ASCII_DIGITS.match(value):
        value = int(value)
    if type(value) is not int or not MIN_MTU <= value <= MAX_MTU:
        raise RecordError(REASON_INVALID_FIELD, f"mtu {_shown(value)} is neither 'auto' nor a number 1280-65535")
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
        listen_port = validate_port(doc.get("listen_port"), what="listen_port")
        published_at = doc.get("published_at", 0.0)
        if type(published_at) not in (int, float) or not math.isfinite(published_at) or published_at < 0:
            raise RecordError(REASON_INVALID_FIELD, "published_at is not a finite, positive number")
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
        name = validate_name(doc.get("name"))
        if name != key_name:
            raise RecordError(REASON_NAME_MISMATCH, f"record names peer {name!r} but sits under {printable(key_name)}")
        public_key = validate_public_key(doc.get("public_key"))
        allowed = parse_allowed_ips(doc)
        if not allowed:
            raise RecordError(REASON_INVALID_CIDR, "an external peer needs at least one allowed IP network")
        endpoint_text = doc.get("endpoint")
        endpoint = None if endpoint_text in (None, "") else Endpoint.parse(endpoint_text)
        keepalive = _optional_int(doc, "persistent_keepalive", 0, 65535)
        return cls(name, public_key, allowed, endpoint, keepalive)


def _reject_constant(name: str) -> object:
    raise RecordError(REASON_INVALID_JSON, f"value is not JSON: {name} is not a number JSON allows")


def decode_json(raw: bytes) -> object:
    """Parse a value from etcd, within the size and nesting bounds; any failure is a RecordError."""
    if len(raw) > MAX_VALUE_BYTES:
        raise RecordError(REASON_TOO_LARGE, f"value of {len(raw)} bytes is larger than {MAX_VALUE_BYTES}")
    # Counting brackets is cheap and bounds the nesting from above; only a value with many of them (inside
    # strings, or a hostile one) is measured exactly, before the recursive parser can be driven to its limit.
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _nesting(raw) > MAX_NESTING:
        raise RecordError(REASON_TOO_LARGE, f"value nests deeper than {MAX_NESTING} levels")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecordError:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, a number of thousands of digits
        raise RecordError(REASON_INVALID_JSON, f"value is not JSON: {printable(str(exc), 120)}") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _nesting(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw``, brackets inside strings not counted."""
    depth = deepest = 0
    for byte in _JSON_STRING.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def encode_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _shown(value: object) -> str:
    return printable(value) if isinstance(value, str | bytes) else printable(repr(value), 40)


def _object(data: object, *, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(REASON_INVALID_FIELD, f"{what} is not a JSON object")
    return data


def _check_schema(doc: dict[str, Any]) -> None:
    schema = doc.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise RecordError(
            REASON_SCHEMA_VERSION,
            f"schema version {_shown(schema)} is not {SCHEMA_VERSION} (written by another version?)",
        )


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise RecordError(REASON_INVALID_FIELD, f"{key} is not a list")
    if len(value) > MAX_ALLOWED_IPS:
        raise RecordError(REASON_TOO_LARGE, f"{key} has {len(value)} entries, more than {MAX_ALLOWED_IPS}")
    return value


def _optional_int(doc: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise RecordError(REASON_INVALID_FIELD, f"{key} {_shown(value)} is not a whole number {low}-{high}")
    return value


def _int_in(doc: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = _optional_int(doc, key, low, high)
    return default if value is None else value
