"""The WireGuard interface as an IP link: address, MTU, up, and routes for peers' networks (pyroute2 only).

Both real backends share this: WireGuard itself knows nothing of IP addresses or routes. Routes we add carry our
own routing-protocol number, so we only ever delete routes we made and never an administrator's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from warren_mesh.wireguard.backend import BackendError

# Routing protocol id marking routes warren-mesh installed (any value above 4 not used by a routing daemon).
ROUTE_PROTOCOL = 158


class LinkError(BackendError):
    """A netlink change to the interface failed; backends let it through as their own error."""


@dataclass(frozen=True, slots=True)
class LinkState:
    index: int
    address: str | None  # "10.96.0.5/16" or None
    mtu: int
    up: bool


def _addresses(ipr: IPRoute, index: int) -> list[str]:
    """The link's addresses as CIDR text, without link-local ones (the kernel adds those to TUN links itself)."""
    found = []
    for entry in ipr.get_addr(index=index):
        text = f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}"
        if not ipaddress.ip_interface(text).ip.is_link_local:
            found.append(text)
    return found


def read_link(ipr: IPRoute, name: str) -> LinkState | None:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    index = found[0]
    link = ipr.get_links(index)[0]
    addresses = _addresses(ipr, index)
    flags = int(link["flags"])
    return LinkState(index, addresses[0] if len(addresses) == 1 else None, int(link.get("IFLA_MTU")), bool(flags & 1))


def configure_link(ipr: IPRoute, name: str, *, address: str, mtu: int) -> None:
    """Set exactly one address and the MTU, and bring the link up."""
    state = read_link(ipr, name)
    if state is None:
        raise LinkError(f"interface {name} does not exist")
    try:
        if state.mtu != mtu:
            ipr.link("set", index=state.index, mtu=mtu)
        iface = ipaddress.ip_interface(address)
        for existing in _addresses(ipr, state.index):
            if existing != str(iface):
                old = ipaddress.ip_interface(existing)
                ipr.addr("del", index=state.index, address=str(old.ip), prefixlen=old.network.prefixlen)
        if state.address != str(iface):
            ipr.addr("replace", index=state.index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        if not state.up:
            ipr.link("set", index=state.index, state="up")
    except NetlinkError as exc:
        raise LinkError(f"configuring {name} ({address}, mtu {mtu}) failed: {exc}") from None


def _routed_outside(address: str | None, networks: tuple[str, ...]) -> list[str]:
    """Networks not already reached through the interface's own (connected) prefix."""
    connected = ipaddress.ip_interface(address).network if address else None
    result = []
    for text in networks:
        net = ipaddress.ip_network(text)
        if connected is not None and net.version == connected.version and net.subnet_of(connected):  # type: ignore[arg-type]
            continue
        result.append(text)
    return result


def add_routes(ipr: IPRoute, name: str, networks: tuple[str, ...]) -> None:
    state = read_link(ipr, name)
    if state is None:
        raise LinkError(f"interface {name} does not exist")
    for net in _routed_outside(state.address, networks):
        try:
            ipr.route("replace", dst=net, oif=state.index, proto=ROUTE_PROTOCOL)
        except NetlinkError as exc:
            raise LinkError(f"route {net} via {name} failed: {exc}") from None


def remove_routes(ipr: IPRoute, name: str, networks: tuple[str, ...]) -> None:
    state = read_link(ipr, name)
    if state is None:
        return
    for net in _routed_outside(state.address, networks):
        try:
            ipr.route("del", dst=net, oif=state.index, proto=ROUTE_PROTOCOL)
        except NetlinkError as exc:
            if exc.code != 3:  # ESRCH: already gone
                raise LinkError(f"removing route {net} via {name} failed: {exc}") from None


def delete_link(ipr: IPRoute, name: str) -> None:
    found = ipr.link_lookup(ifname=name)
    if found:
        ipr.link("del", index=found[0])
