"""The validators of names, public keys, ports, addresses and networks read from etcd, flags and custom resources.

Every field is checked before it is used; text is parsed only where it must be, and then as ASCII. What a record
may *claim* (networks, endpoints) is ``trust.networks``' to say.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from typing import Any, Final

from warren_mesh.trust.decode import bounded_list
from warren_mesh.trust.networks import network_problem, overlay_problem
from warren_mesh.trust.reasons import (
    REASON_FORBIDDEN_NETWORK,
    REASON_INVALID_CIDR,
    REASON_INVALID_ENDPOINT,
    REASON_INVALID_FIELD,
    REASON_INVALID_PUBLIC_KEY,
    RecordError,
)
from warren_mesh.trust.text import printable, shown
from warren_mesh.values import netaddr
from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip

MIN_MTU: Final = 1280


MAX_MTU: Final = 65535


# Kubernetes node names are DNS-1123 subdomains; etcd keys and metric labels are safe with them as they are.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


_ASCII_DIGITS = re.compile(r"^[0-9]{1,5}$")


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
        return netaddr.parse_network(value)
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
