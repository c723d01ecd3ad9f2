"""Allocation: which overlay address and pod subnet a node takes, judged from the claims every agent sees alike.

Pure: the registrar lists the claims, asks here what it holds and what to try next, and writes. A node starts
looking where its name hashes to, so nodes joining at once rarely race for the same address or subnet, and a node
whose claims were lost tends to get its old ones back.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.networks import usable_host_range
from warren_mesh.trust.records import MeshConfig
from warren_mesh.values.keyspace import ClaimKind, KeySchema
from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip


class RegistrationConflict(RuntimeError):
    """Our node name is held by a record we must not overwrite, or what we were told to take is not ours."""


class AddressSpaceExhausted(RuntimeError):
    """Every address of the mesh network is reserved."""


@dataclass(slots=True)
class Holdings:
    """What a node holds (the lowest address in the mesh network, the lowest subnet of the mesh's size in the pod
    network), what others hold, and its own claims that lost to an older one (to withdraw)."""

    address: IPAddress | None = None
    subnet: IPNetwork | None = None
    taken_addresses: set[int] = field(default_factory=set)
    taken_subnets: set[str] = field(default_factory=set)
    lost: list[tuple[str, ClaimKind]] = field(default_factory=list)  # (subject, kind) of our claims that lost


def holdings(claims: MeshReader, config: MeshConfig, name: str, schema: KeySchema) -> Holdings:
    """``name``'s holdings among the claims of ``claims`` (a view of the claims alone)."""
    found = Holdings()
    for subject, holder in claims.reservations.items():
        subnet = "/" in subject
        if holder.owner != name:
            if subnet:
                found.taken_subnets.add(subject)
            else:
                found.taken_addresses.add(int(parse_ip(subject)))
            kind: ClaimKind = "pods" if subnet else "overlay"
            own = schema.claim(name, subject, kind)
            if any(claim.key == own for claim in claims.claims_on(subject)):
                found.lost.append((subject, kind))
        elif subnet:
            network = ipaddress.ip_network(subject)
            lower = found.subnet is None or int(network.network_address) < int(found.subnet.network_address)
            if config.is_node_subnet(network) and lower:
                found.subnet = network
        else:
            ip = parse_ip(subject)
            if ip in config.overlay_cidr and (found.address is None or int(ip) < int(found.address)):
                found.address = ip
    return found


def start_index(name: str, count: int) -> int:
    """Where ``name`` starts looking among ``count`` candidates."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count


def address_candidates(name: str, cidr: IPNetwork, taken: set[int]) -> Iterator[IPAddress]:
    """The usable addresses of ``cidr`` not ``taken``, in ``name``'s order."""
    first, last = usable_host_range(cidr)
    size = last - first + 1
    start = start_index(name, size)
    for step in range(size):
        candidate = first + (start + step) % size
        if candidate not in taken:
            yield ipaddress.ip_address(candidate)


def subnet_candidates(name: str, config: MeshConfig, taken: set[str]) -> Iterator[IPNetwork]:
    """The node subnets of the pod network not ``taken``, in ``name``'s order."""
    pods, prefix = config.pod_cidr, config.node_subnet_prefix
    count, size = config.node_subnets(), 1 << (pods.max_prefixlen - prefix)
    start = start_index(name, count)
    for step in range(count):
        subnet = ipaddress.ip_network(f"{pods.network_address + (start + step) % count * size}/{prefix}")
        if str(subnet) not in taken:
            yield subnet


def pinned_subnet(pinned: IPNetwork, config: MeshConfig, found: Holdings) -> IPNetwork:
    """``pinned`` (--pod-subnet), if this mesh can give it to us."""
    if not config.is_node_subnet(pinned):
        raise RegistrationConflict(
            f"--pod-subnet {pinned} is not a /{config.node_subnet_prefix} of the pod network {config.pod_cidr}"
        )
    if str(pinned) in found.taken_subnets:
        raise RegistrationConflict(f"--pod-subnet {pinned} is claimed by another node")
    return pinned
