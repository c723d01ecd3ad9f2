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
from warren_mesh.trust.records import MeshConfig, PodNetwork
from warren_mesh.values.keyspace import ClaimKind, KeySchema
from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip


class RegistrationConflict(RuntimeError):
    """Our node name is held by a record we must not overwrite, or what we were told to take is not ours."""


class AddressSpaceExhausted(RuntimeError):
    """Every address of the mesh network is reserved."""


@dataclass(slots=True)
class Holdings:
    """What a node holds (an address in each overlay network, a subnet of the mesh's size in each pod network, by
    IP version), what others hold, and its own claims to withdraw: those that lost to an older one, those that
    take nothing because it holds an older one of their kind, and those this mesh cannot use (left by an earlier
    config)."""

    addresses: dict[int, IPAddress] = field(default_factory=dict)
    subnets: dict[int, IPNetwork] = field(default_factory=dict)
    taken_addresses: dict[int, set[int]] = field(default_factory=lambda: {4: set(), 6: set()})
    taken_subnets: set[str] = field(default_factory=set)
    withdraw: dict[str, str] = field(default_factory=dict)  # claim key -> why


def holdings(claims: MeshReader, config: MeshConfig, name: str, schema: KeySchema) -> Holdings:
    """``name``'s holdings among the claims of ``claims`` (a view of the claims alone). Every claim of ours that
    is not a holding is to be withdrawn before we claim anything: a new claim is younger than any of ours, so it
    would take nothing while an older one of its kind stands."""
    found = Holdings()
    for subject, holder in claims.reservations.items():
        subnet = "/" in subject
        kind: ClaimKind = "pods" if subnet else "overlay"
        own = schema.claim(name, subject, kind)
        if holder.owner != name:
            if subnet:
                found.taken_subnets.add(subject)
            else:
                ip = parse_ip(subject)
                found.taken_addresses[ip.version].add(int(ip))
            if any(claim.key == own for claim in claims.claims_on(subject)):
                found.withdraw[own] = f"{holder.owner} holds {subject}"
        elif subnet and config.pod_network_of(network := ipaddress.ip_network(subject)) is not None:
            found.subnets[network.version] = network
        elif not subnet and (overlay := config.overlay_of((ip := parse_ip(subject)).version)) and ip in overlay:
            found.addresses[ip.version] = ip
        elif holder.key == own:  # not an ipam/ reservation of the old schema, which is not ours to delete
            found.withdraw[own] = f"{subject} is outside the mesh's {'pod' if subnet else 'overlay'} networks"
    for key in claims.surplus_claims(name):
        found.withdraw[key] = "it holds an older claim of that kind"
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
            yield ipaddress.ip_address(candidate) if cidr.version == 4 else ipaddress.IPv6Address(candidate)


def subnet_candidates(name: str, pods: PodNetwork, taken: set[str]) -> Iterator[IPNetwork]:
    """The node subnets of the pod network not ``taken``, in ``name``'s order."""
    count, size = pods.node_subnets(), 1 << (pods.cidr.max_prefixlen - pods.node_prefix)
    start = start_index(name, count)
    for step in range(count):
        subnet = ipaddress.ip_network(f"{pods.cidr.network_address + (start + step) % count * size}/{pods.node_prefix}")
        if str(subnet) not in taken:
            yield subnet


def pinned_subnet(pinned: IPNetwork, config: MeshConfig, found: Holdings) -> IPNetwork:
    """``pinned`` (--pod-subnet), if this mesh can give it to us."""
    if config.pod_network_of(pinned) is None:
        networks = ", ".join(f"/{p.node_prefix} of {p.cidr}" for p in config.pod_networks)
        raise RegistrationConflict(f"--pod-subnet {pinned} is not a node subnet of the pod networks ({networks})")
    if str(pinned) in found.taken_subnets:
        raise RegistrationConflict(f"--pod-subnet {pinned} is claimed by another node")
    return pinned
