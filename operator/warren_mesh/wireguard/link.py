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

    def configure(self, *, address: str, mtu: int) -> None:
        """Set exactly one address and the MTU, and bring the link up."""
        state = self.read()
        if state is None:
            raise LinkError(f"interface {self.name} does not exist")
        ipr = self._ipr
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
            raise LinkError(f"configuring {self.name} ({address}, mtu {mtu}) failed: {exc}") from None
        finally:
            self.forget()

    def add_routes(self, networks: tuple[str, ...]) -> None:
        state = self._state()
        if state is None:
            raise LinkError(f"interface {self.name} does not exist")
        for net in _routed_outside(state.address, networks):
            try:
                self._ipr.route("replace", dst=net, oif=state.index, proto=ROUTE_PROTOCOL)
            except NetlinkError as exc:
                self.forget()
                raise LinkError(f"route {net} via {self.name} failed: {exc}") from None

    def remove_routes(self, networks: tuple[str, ...]) -> None:
        state = self._state()
        if state is None:
            return
        for net in _routed_outside(state.address, networks):
            try:
                self._ipr.route("del", dst=net, oif=state.index, proto=ROUTE_PROTOCOL)
            except NetlinkError as exc:
                if exc.code != 3:  # ESRCH: already gone
                    self.forget()
                    raise LinkError(f"removing route {net} via {self.name} failed: {exc}") from None

    def delete(self) -> None:
        self.forget()
        found = self._ipr.link_lookup(ifname=self.name)
        if found:
            self._ipr.link("del", index=found[0])


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
