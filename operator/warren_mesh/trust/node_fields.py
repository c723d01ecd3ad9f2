"""The fields only a node record has, checked: its endpoints (one per underlay family, for its location and for the
others), its overlay addresses, where it sees its peers, its location and the peers it cannot reach.
"""

from __future__ import annotations

import re
from typing import Any, Final

from warren_mesh.trust.decode import bounded_list
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.fields import validate_name
from warren_mesh.trust.networks import endpoint_problem
from warren_mesh.trust.reasons import REASON_INVALID_CIDR, REASON_INVALID_ENDPOINT, REASON_INVALID_FIELD, RecordError
from warren_mesh.trust.text import printable
from warren_mesh.values.netaddr import IPAddress, parse_ip

MAX_OBSERVED_ENDPOINTS: Final = 256


def endpoints_of(doc: dict[str, Any]) -> tuple[Endpoint, ...]:
    """``endpoints`` (one per family, preferred first) or else ``endpoint`` alone; both given, they agree."""
    first = Endpoint.parse(doc.get("endpoint"))
    if "endpoints" not in doc:
        return (first,)
    endpoints = tuple(Endpoint.parse(text) for text in bounded_list(doc, "endpoints"))
    if not 1 <= len(endpoints) <= 2 or len({e.host.version for e in endpoints}) != len(endpoints):
        raise RecordError(REASON_INVALID_ENDPOINT, "endpoints must be one endpoint, or one IPv4 and one IPv6")
    if endpoints[0] != first:
        raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {first} is not the first of endpoints")
    return endpoints


def _overlay_ip(text: object) -> IPAddress:
    if not isinstance(text, str) or len(text) > 45:
        raise RecordError(REASON_INVALID_FIELD, "overlay_ip is missing or not an address")
    try:
        overlay_ip = parse_ip(text)
    except ValueError:
        raise RecordError(REASON_INVALID_CIDR, f"overlay_ip {printable(text)} is not an IP") from None
    if endpoint_problem(overlay_ip) is not None:
        raise RecordError(REASON_INVALID_CIDR, f"overlay_ip {overlay_ip} is not an address a mesh can use")
    return overlay_ip


def overlay_ips_of(doc: dict[str, Any]) -> tuple[IPAddress, ...]:
    """``overlay_ips`` (one per overlay network, in the mesh's order) or else ``overlay_ip`` alone."""
    first = _overlay_ip(doc.get("overlay_ip"))
    if "overlay_ips" not in doc:
        return (first,)
    addresses = tuple(_overlay_ip(text) for text in bounded_list(doc, "overlay_ips"))
    if not 1 <= len(addresses) <= 2 or len({a.version for a in addresses}) != len(addresses):
        raise RecordError(REASON_INVALID_CIDR, "overlay_ips must be one address, or one IPv4 and one IPv6")
    if addresses[0] != first:
        raise RecordError(REASON_INVALID_CIDR, f"overlay_ip {first} is not the first of overlay_ips")
    return addresses


def observed_endpoints_of(value: object) -> tuple[tuple[str, Endpoint], ...]:
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


# Peers a node says it cannot reach: at most one per peer, and a record of a sane size.
MAX_UNREACHABLE: Final = 256
# A location is a Kubernetes label value (topology.kubernetes.io/zone or region): it names a claim key and a
# metric label as it is.
_LOCATION = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def validate_location(value: object) -> str:
    """A location's name: a Kubernetes label value, at most 63 characters."""
    if not isinstance(value, str) or not _LOCATION.match(value):
        raise RecordError(
            REASON_INVALID_FIELD,
            f"location {printable(str(value))} is not a label value (letters, digits, '-', '_', '.'; at most 63)",
        )
    return value


def location_of(doc: dict[str, Any]) -> str | None:
    value = doc.get("location")
    return None if value is None else validate_location(value)


def external_endpoints_of(doc: dict[str, Any]) -> tuple[Endpoint, ...]:
    """``external_endpoints``: where nodes of other locations dial this one (one per family), or none."""
    if doc.get("external_endpoints") is None:
        return ()
    endpoints = tuple(Endpoint.parse(text) for text in bounded_list(doc, "external_endpoints"))
    if not 1 <= len(endpoints) <= 2 or len({e.host.version for e in endpoints}) != len(endpoints):
        raise RecordError(REASON_INVALID_ENDPOINT, "external_endpoints must be one endpoint, or one IPv4 and one IPv6")
    return endpoints


def unreachable_of(value: object) -> tuple[str, ...]:
    """``unreachable``: the nodes this one should reach directly but cannot (docs/topology.md#relays)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_UNREACHABLE:
        raise RecordError(REASON_INVALID_FIELD, f"unreachable is not a list of at most {MAX_UNREACHABLE} node names")
    return tuple(sorted({validate_name(name) for name in value}))


def node_names_of(doc: dict[str, Any], key: str) -> tuple[str, ...] | None:
    """A list of node names under ``key`` (the mesh config's gateways and relays), or None when absent."""
    if doc.get(key) is None:
        return None
    return tuple(sorted({validate_name(name) for name in bounded_list(doc, key)}))
