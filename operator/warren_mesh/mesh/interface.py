"""The device's own settings beside its peers: its overlay addresses, its MTU, and the pod networks routed into it
whole. Pure: from the mesh config and this node alone."""

from __future__ import annotations

from warren_mesh.mesh.claims import LocalNode
from warren_mesh.trust.records import MeshConfig


def device_mtu(config: MeshConfig, auto_mtu: int) -> int:
    """The mesh's MTU, or for ``mtu: auto`` what this node's underlay allows (``model.auto_mtu``)."""
    return config.mtu if config.mtu is not None else auto_mtu


def interface_addresses(config: MeshConfig, local: LocalNode) -> tuple[str, ...]:
    """This node's overlay addresses with their networks' prefix lengths, IPv4 first."""
    addresses = []
    for ip in sorted(local.overlay_ips, key=lambda ip: ip.version):
        network = config.overlay_of(ip.version)
        addresses.append(f"{ip}/{network.prefixlen if network is not None else ip.max_prefixlen}")
    return tuple(addresses)


def pod_aggregates(config: MeshConfig, local: LocalNode) -> tuple[str, ...]:
    """Each pod network as one route into the device, unless it covers a network this node must reach outside the
    tunnel (its underlay, etcd): then each peer's subnet in it is routed alone, and checked alone, as before."""
    return tuple(
        str(pods)
        for pods in config.pod_cidrs
        if not any(pods.version == net.version and pods.overlaps(net) for net in local.protected)
    )
