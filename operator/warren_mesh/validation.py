"""What makes a value read from etcd valid: the error every failed check raises and the reason it is counted
under, the bounds on size and nesting, and the validators of names, keys, ports, endpoints, networks and JSON.

Every byte read from etcd is hostile until proven otherwise: values are bounded in size and nesting before they
are parsed, numbers must be JSON numbers of the right type and range (text is parsed only where it must be, and
then as ASCII), and every field is checked before it is used. What a record may *claim* (networks, endpoints) is
``admission``'s to say; the records themselves are ``model``'s.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from warren_mesh.admission import endpoint_problem, network_problem, overlay_problem
from warren_mesh.netaddr import IPAddress, IPNetwork, parse_ip

SCHEMA_VERSION: Final = 1
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
        raise RecordError(reason, f"{what} {shown(value)} is not a port number (1-65535)")
    return value


def parse_network(value: object, *, what: str) -> IPNetwork:
    if not isinstance(value, str):
        raise RecordError(REASON_INVALID_CIDR, f"{what} {shown(value)} is not a string")
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
    if not doc.get("allowed_ips", True):  # most node records: nothing besides the overlay address
        bounded_list(doc, "allowed_ips")  # still a list, not 0 or ""
        return ()
    networks = tuple(parse_routed_network(n, what="allowed_ips entry") for n in bounded_list(doc, "allowed_ips"))
    spans = sorted((n.version, int(n.network_address), int(n.broadcast_address), n) for n in networks)
    for (version, _, last, network), (next_version, next_first, _, following) in itertools.pairwise(spans):
        if version == next_version and next_first <= last:
            raise RecordError(REASON_INVALID_CIDR, f"allowed_ips entries {network} and {following} overlap")
    return networks


def parse_overlay(doc: dict[str, Any], key: str, default: IPNetwork) -> IPNetwork:
    if key not in doc:
        return default
    network = parse_network(doc[key], what=key)
    problem = overlay_problem(network)
    if problem is not None:
        raise RecordError(REASON_INVALID_CIDR, f"{key}: {problem}")
    return network


def parse_mtu(value: object) -> int | None:
    """``"auto"`` (None) or a number from 1280 (the IPv6 minimum) to 65535, as a JSON number or ASCII digits."""
    if value == "auto":
        return None
    if isinstance(value, str) and _ASCII_DIGITS.match(value):
        value = int(value)
    if type(value) is not int or not MIN_MTU <= value <= MAX_MTU:
        raise RecordError(REASON_INVALID_FIELD, f"mtu {shown(value)} is neither 'auto' nor a number 1280-65535")
    return value


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


def shown(value: object) -> str:
    return printable(value) if isinstance(value, str | bytes) else printable(repr(value), 40)


def json_object(data: object, *, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(REASON_INVALID_FIELD, f"{what} is not a JSON object")
    return data


def check_schema(doc: dict[str, Any]) -> None:
    schema = doc.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise RecordError(
            REASON_SCHEMA_VERSION,
            f"schema version {shown(schema)} is not {SCHEMA_VERSION} (written by another version?)",
        )


def bounded_list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise RecordError(REASON_INVALID_FIELD, f"{key} is not a list")
    if len(value) > MAX_ALLOWED_IPS:
        raise RecordError(REASON_TOO_LARGE, f"{key} has {len(value)} entries, more than {MAX_ALLOWED_IPS}")
    return value


def optional_int(doc: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise RecordError(REASON_INVALID_FIELD, f"{key} {shown(value)} is not a whole number {low}-{high}")
    return value


def int_in(doc: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = optional_int(doc, key, low, high)
    return default if value is None else value
