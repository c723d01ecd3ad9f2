"""Facts about this host's underlay network, read through netlink (pyroute2), never by running `ip`."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute

from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip

DEFAULT_MTU = 1500


class UnderlayError(RuntimeError):
    """The underlay could not tell us what we need; the message names the flag that settles it."""


def default_route_addresses(family: str = "auto") -> tuple[IPAddress, ...]:
    """The primary address of the interface that carries each default route (``family``: "auto" is IPv4's, or
    IPv6's when there is no IPv4 one; "ipv4", "ipv6"; "dual" both, of those the host has)."""
    versions = {"ipv4": (4,), "ipv6": (6,)}.get(family, (4, 6))
    found: list[IPAddress] = []
    with IPRoute() as ipr:
        for version in versions:
            address = _default_route_address(ipr, socket.AF_INET if version == 4 else socket.AF_INET6)
            if address is not None:
                found.append(address)
    if family == "auto":
        found = found[:1]
    if not found:
        which = {"ipv4": "IPv4 ", "ipv6": "IPv6 "}.get(family, "")
        raise UnderlayError(f"this host has no {which}default route with an address; pass --endpoint IP:PORT")
    return tuple(found)


def _default_route_address(ipr: IPRoute, family: int) -> IPAddress | None:
    for route in ipr.get_default_routes(family=family):
        oif = route.get("RTA_OIF")
        if oif is None:
            continue
        for addr in ipr.get_addr(index=oif, family=family):
            ip = ipaddress.ip_address(addr.get("IFA_ADDRESS"))
            if not ip.is_link_local:
                return ip
    return None


def mtu_of_address(address: IPAddress) -> int:
    """MTU of the interface that holds ``address`` (the interface WireGuard's packets leave through)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=family):
            if addr.get("IFA_ADDRESS") == str(address):
                links = ipr.get_links(addr["index"])
                if links:
                    return int(links[0].get("IFLA_MTU") or DEFAULT_MTU)
    return DEFAULT_MTU


def subnets_of_address(address: IPAddress) -> tuple[IPNetwork, ...]:
    """The networks of ``address`` as configured on this host's interfaces (its connected underlay subnets)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        return tuple(
            ipaddress.ip_interface(f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}").network
            for entry in ipr.get_addr(family=family)
            if entry.get("IFA_ADDRESS") == str(address)
        )


def addresses_of_hosts(hosts: Iterable[str]) -> tuple[IPAddress, ...]:
    """The addresses ``hosts`` (IP literals or names) stand for now; a name that does not resolve gives none."""
    found: list[IPAddress] = []
    for host in hosts:
        try:
            found.append(parse_ip(host.strip("[]")))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        found.extend(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos)
    return tuple(dict.fromkeys(found))
