"""What a record from etcd may claim: which networks may be routed into the mesh and which endpoints dialled.

etcd is shared by every node, so everything read from it is untrusted, even with authentication on: a leaked
node credential writes records like any other. These rules depend on the record alone (and, for the mesh
network, on the mesh config), so the agent, the operator and the CLI share one definition and every node reaches
the same verdict. What depends on this node (its underlay, its etcd) is checked again where the plan meets the
device (``NetworkGuard``).

Special-purpose ranges are refused whenever a claimed network *overlaps* them, not only when it equals them: the
two halves of the default route (0.0.0.0/1 and 128.0.0.0/1) each overlap one (0.0.0.0/8 and 224.0.0.0/4), so no
split of the default route gets through either.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from warren_mesh.values.netaddr import IPAddress, IPNetwork

# Ranges that no WireGuard peer may be routed: this host's own (loopback, "this network"), the link (link-local,
# cloud metadata at 169.254.169.254), multicast and broadcast, reserved and IPv4-mapped space.
SPECIAL_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",  # reserved, and 255.255.255.255
        "::/127",  # unspecified and loopback
        "::ffff:0:0/96",  # IPv4-mapped: an IPv4 destination in disguise
        "fe80::/10",
        "ff00::/8",
    )
)

# The same as integer spans by IP version: every record's endpoint and overlay address is checked against them, and
# comparing integers costs a tenth of asking ipaddress (decoding a node record: 15 -> 11 us).
_SPECIAL_SPANS: Final = {
    version: tuple(
        (int(n.network_address), int(n.broadcast_address), n) for n in SPECIAL_NETWORKS if n.version == version
    )
    for version in (4, 6)
}

# Networks broader than these are refused outright: no remote site is that large, and such a claim would take
# over a large part of the internet's traffic from every node.
MIN_PREFIX_LENGTH: Final = {4: 8, 6: 16}


def network_problem(network: IPNetwork) -> str | None:
    """Why ``network`` may never be routed to a peer, or None."""
    if network.prefixlen == 0:
        return f"{network} is a default route"
    if network.prefixlen < MIN_PREFIX_LENGTH[network.version]:
        return f"{network} is broader than /{MIN_PREFIX_LENGTH[network.version]}"
    start, end = int(network.network_address), int(network.broadcast_address)
    for first, last, special in _SPECIAL_SPANS[network.version]:
        if start <= last and end >= first:
            return f"{network} overlaps the special-purpose range {special}"
    return None


def endpoint_problem(host: IPAddress) -> str | None:
    """Why ``host`` is not an address a remote WireGuard peer can have, or None."""
    if isinstance(host, ipaddress.IPv6Address):
        if host.scope_id:
            return f"{host} carries a scope (%{host.scope_id}): only global addresses can be dialled"
        if host.ipv4_mapped is not None:
            return f"{host} is an IPv4-mapped address; write the IPv4 address itself"
    value = int(host)
    for first, last, special in _SPECIAL_SPANS[host.version]:
        if first <= value <= last:
            return f"{host} is in the special-purpose range {special}"
    return None


def overlay_problem(network: IPNetwork) -> str | None:
    """Why ``network`` cannot be a mesh's overlay (or pod) network, or None."""
    problem = network_problem(network)
    if problem is not None:
        return problem
    if network.num_addresses < 4:
        return f"{network} is too small for a mesh"
    return None


def usable_host_range(network: IPNetwork) -> tuple[int, int]:
    """First and last address a node may take: in IPv4 networks above /31, not the network or broadcast address;
    in IPv6 not the subnet-router anycast address (the network's first)."""
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.num_addresses > 2:
        first, last = first + 1, last - (1 if network.version == 4 else 0)
    return first, last
