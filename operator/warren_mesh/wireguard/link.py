"""The WireGuard interface as an IP link: address, MTU, up, and routes for peers' networks (pyroute2 only).

Both real backends share this: WireGuard itself knows nothing of IP addresses or routes. Routes we add carry our
own routing-protocol number, so we only ever delete routes we made and never an administrator's; and a route is
added only where no route of someone else's is (the kernel's connected route of the underlay, say): a route
for the same destination that is not ours is left alone and the change fails. As a last line, whatever the
deciding code let through, a default route or a special-purpose range (loopback, link-local, multicast) is never
routed into the tunnel.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from warren_mesh.trust.networks import network_problem
from warren_mesh.wireguard.backend import BackendError

# Routing protocol id marking routes warren-mesh installed (any value above 4 not used by a routing daemon).
ROUTE_PROTOCOL = 158
MAIN_TABLE = 254


class LinkError(BackendError):
    """A netlink change to the interface failed; backends let it through as their own error."""


@dataclass(frozen=True, slots=True)
class LinkState:
    index: int
    addresses: tuple[str, ...]  # ("10.96.0.5/16", "fd96::5/64"): IPv4 first, as InterfaceSpec has them
    mtu: int
    up: bool


def _addresses(ipr: IPRoute, index: int) -> list[str]:
    """The link's addresses as canonical CIDR text, IPv4 first, without link-local ones (the kernel adds those to
    TUN links itself)."""
    found = []
    for entry in ipr.get_addr(index=index):
        interface = ipaddress.ip_interface(f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}")
        if not interface.ip.is_link_local:
            found.append(interface)
    return [str(i) for i in sorted(found, key=lambda i: (i.version, str(i)))]


def read_link(ipr: IPRoute, name: str) -> LinkState | None:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    index = found[0]
    link = ipr.get_links(index)[0]
    addresses = _addresses(ipr, index)
    flags = int(link["flags"])
    return LinkState(index, tuple(addresses), int(link.get("IFLA_MTU")), bool(flags & 1))


class InterfaceLink:
    """One WireGuard interface's IP side (address, MTU, up, routes), through the backend's netlink socket.

    Routing a peer's networks needs the link's index and address. Reading them back for every peer cost three
    netlink requests per peer (most of the ~2 s a wireguard-go agent took to configure 1000 peers), so the
    link's state is remembered: refreshed by every read, forgotten by configure, by delete, by a failed change and
    when the backend replaces the device. A stale memory therefore costs at most one failed change, which the
    reconciler retries.
    """

    def __init__(self, ipr: IPRoute, name: str) -> None:
        self._ipr = ipr
        self.name = name
        self._known: LinkState | None = None

    def read(self) -> LinkState | None:
        self._known = read_link(self._ipr, self.name)
        return self._known

    def forget(self) -> None:
        self._known = None

    def _state(self) -> LinkState | None:
        return self._known if self._known is not None else self.read()

    def configure(self, *, addresses: tuple[str, ...], mtu: int) -> None:
        """Set exactly these addresses (one per family) and the MTU, and bring the link up."""
        state = self.read()
        if state is None:
            raise LinkError(f"interface {self.name} does not exist")
        ipr = self._ipr
        wanted = [ipaddress.ip_interface(address) for address in addresses]
        try:
            if state.mtu != mtu:
                ipr.link("set", index=state.index, mtu=mtu)
            for existing in state.addresses:
                if ipaddress.ip_interface(existing) not in wanted:
                    old = ipaddress.ip_interface(existing)
                    ipr.addr("del", index=state.index, address=str(old.ip), prefixlen=old.network.prefixlen)
            for iface in wanted:
                if str(iface) not in state.addresses:
                    ipr.addr("replace", index=state.index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if not state.up:
                ipr.link("set", index=state.index, state="up")
        except NetlinkError as exc:
            raise LinkError(f"configuring {self.name} ({', '.join(addresses)}, mtu {mtu}) failed: {exc}") from None
        finally:
            self.forget()

    def refuse_unroutable(self, networks: Sequence[str]) -> None:
        """Raise before anything is changed if one of ``networks`` may never be routed into the tunnel (backends
        call this before they give a peer its allowed IPs)."""
        for net in networks:
            problem = network_problem(ipaddress.ip_network(net))
            if problem is not None:
                raise LinkError(f"refusing to route {net} via {self.name}: {problem}")

    def add_route(self, net: str) -> None:
        self.refuse_unroutable((net,))
        state = self._state()
        if state is None:
            raise LinkError(f"interface {self.name} does not exist")
        try:
            # "add" fails where any route for the destination exists; only one of ours is then replaced.
            self._ipr.route("add", dst=net, oif=state.index, proto=ROUTE_PROTOCOL)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                self.forget()
                raise LinkError(f"route {net} via {self.name} failed: {exc}") from None
            self._replace_own_route(net, state.index)

    def remove_route(self, net: str) -> None:
        state = self._state()
        if state is None:
            return  # the link is gone, and its routes with it
        try:
            # Only a route of ours matches: the kernel compares the protocol of the route it deletes.
            self._ipr.route("del", dst=net, oif=state.index, proto=ROUTE_PROTOCOL)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:  # already gone
                self.forget()
                raise LinkError(f"removing route {net} via {self.name} failed: {exc}") from None

    def read_routes(self) -> frozenset[str]:
        """Destinations of the routes of ours (protocol 158) through this link, IPv4 and IPv6."""
        state = self._state()
        if state is None:
            return frozenset()
        found = set()
        for family, default in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for route in self._ipr.get_routes(family=family, table=MAIN_TABLE, proto=ROUTE_PROTOCOL):
                if route.get("RTA_OIF") == state.index:
                    found.add(str(ipaddress.ip_network(f"{route.get('RTA_DST', default)}/{route['dst_len']}")))
        return frozenset(found)

    def _replace_own_route(self, net: str, index: int) -> None:
        """Point an existing route for ``net`` at ``index``, if that route is ours; refuse otherwise."""
        network = ipaddress.ip_network(net)
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        existing = [
            route
            for route in self._ipr.get_routes(family=family, table=MAIN_TABLE)
            if route["dst_len"] == network.prefixlen
            and route.get("RTA_DST", "0.0.0.0" if network.version == 4 else "::") == str(network.network_address)
        ]
        foreign = [r for r in existing if r["proto"] != ROUTE_PROTOCOL]
        if foreign:
            raise LinkError(
                f"not routing {net} via {self.name}: a route for it that warren-mesh did not make exists "
                f"(protocol {foreign[0]['proto']}); it is left as it is"
            )
        if any(r.get("RTA_OIF") == index for r in existing):
            return  # ours already, through this interface
        try:
            self._ipr.route("replace", dst=net, oif=index, proto=ROUTE_PROTOCOL)
        except NetlinkError as exc:
            self.forget()
            raise LinkError(f"route {net} via {self.name} failed: {exc}") from None

    def delete(self) -> None:
        self.forget()
        found = self._ipr.link_lookup(ifname=self.name)
        if found:
            self._ipr.link("del", index=found[0])
