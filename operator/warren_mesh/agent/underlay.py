"""Facts about this host's underlay network, read through netlink (pyroute2), never by running `ip`."""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute

from warren_mesh.model import IPAddress

DEFAULT_MTU = 1500


class UnderlayError(RuntimeError):
    """The underlay could not tell us what we need; the message names the flag that settles it."""


def default_route_address() -> IPAddress:
    """The primary address of the interface that carries the default route (IPv4 first, then IPv6)."""
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_default_routes(family=family):
                oif = route.get("RTA_OIF")
                if oif is None:
                    continue
                for addr in ipr.get_addr(index=oif, family=family):
                    ip = ipaddress.ip_address(addr.get("IFA_ADDRESS"))
                    if not ip.is_link_local:
                        return ip
    raise UnderlayError("this host has no default route with an address; pass --endpoint HOST:PORT")


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
