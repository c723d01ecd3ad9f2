"""The machine an agent runs on, as the agent sees it: where its underlay is and what it allows, how it reaches
etcd's hosts, and the network of its pods. ``Host`` is what the agent asks; ``NodeHost`` answers for this machine
(netlink, the resolver, nftables and the CNI config directory); host/simulated.py for agents on memory devices
sharing one machine."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import Final, Protocol

from warren_mesh.host import underlay
from warren_mesh.host.pod_network import PodNetwork
from warren_mesh.settings import PodSettings
from warren_mesh.values.netaddr import IPAddress, IPNetwork

# What a poke sends, to the discard port (RFC 863): whatever answers it, or nothing, WireGuard's keepalive comes.
POKE: Final = b"warren-mesh: endpoint check\n"
DISCARD_PORT: Final = 9


class Host(Protocol):
    # Whether the device's peers are seen at the addresses their packets really come from (so that this node
    # can tell a peer behind NAT where it is seen, and learn where it is seen itself; docs/nat.md).
    sees_peer_endpoints: bool

    def endpoint_addresses(self, family: str) -> tuple[IPAddress, ...]:
        """The addresses peers reach this node at when nothing says otherwise (``family``: which default routes
        give them, settings.RegistrationSettings.endpoint_family)."""
        ...

    def underlay_mtu(self, address: IPAddress) -> int:
        """The MTU of the interface holding ``address``."""
        ...

    def underlay_networks(self, address: IPAddress) -> tuple[IPNetwork, ...]:
        """The networks on the interface holding ``address`` (never to be routed into the tunnel)."""
        ...

    def resolve(self, hosts: Iterable[str]) -> tuple[IPAddress, ...]:
        """The addresses of ``hosts`` (etcd's; never to be routed into the tunnel either)."""
        ...

    def pod_network(
        self, settings: PodSettings, *, subnets: tuple[IPNetwork, ...], interface: str
    ) -> PodNetwork | None:
        """This node's pods' network for ``subnets`` through ``interface`` (None: this host has no pods)."""
        ...

    def poke(self, address: IPAddress) -> None:
        """Send one small datagram to a peer's overlay ``address``, through the tunnel: its WireGuard answers any
        data with a keepalive within 10 s, so this node hears the peer at the endpoint it has for it, if anything
        there can answer (docs/nat.md#trust)."""
        ...


class NodeHost:
    """This machine."""

    sees_peer_endpoints = True

    def endpoint_addresses(self, family: str) -> tuple[IPAddress, ...]:
        return underlay.default_route_addresses(family)

    def underlay_mtu(self, address: IPAddress) -> int:
        return underlay.mtu_of_address(address)

    def underlay_networks(self, address: IPAddress) -> tuple[IPNetwork, ...]:
        return underlay.subnets_of_address(address)

    def resolve(self, hosts: Iterable[str]) -> tuple[IPAddress, ...]:
        return underlay.addresses_of_hosts(hosts)

    def pod_network(
        self, settings: PodSettings, *, subnets: tuple[IPNetwork, ...], interface: str
    ) -> PodNetwork | None:
        return PodNetwork(settings, subnets=subnets, interface=interface) if settings.route else None

    def poke(self, address: IPAddress) -> None:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(POKE, (str(address), DISCARD_PORT))
