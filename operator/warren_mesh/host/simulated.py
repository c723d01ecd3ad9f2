"""A host for agents on memory devices, many to one machine (the demo, the tests' and the benchmarks' simulated
nodes): their addresses are on no interface of it, they have no pods, and their devices see no packets."""

from __future__ import annotations

from collections.abc import Iterable

from warren_mesh.host import underlay
from warren_mesh.host.pod_network import PodNetwork
from warren_mesh.settings import PodSettings
from warren_mesh.values.netaddr import IPAddress, IPNetwork


class SimulatedHost:
    sees_peer_endpoints = False

    def endpoint_addresses(self, family: str) -> tuple[IPAddress, ...]:
        return underlay.default_route_addresses(family)

    def underlay_mtu(self, address: IPAddress) -> int:
        return underlay.DEFAULT_MTU

    def underlay_networks(self, address: IPAddress) -> tuple[IPNetwork, ...]:
        return ()

    def resolve(self, hosts: Iterable[str]) -> tuple[IPAddress, ...]:
        return underlay.addresses_of_hosts(hosts)

    def pod_network(
        self, settings: PodSettings, *, subnets: tuple[IPNetwork, ...], interface: str
    ) -> PodNetwork | None:
        return None

    def poke(self, address: IPAddress) -> None:
        return  # a memory device carries nothing
