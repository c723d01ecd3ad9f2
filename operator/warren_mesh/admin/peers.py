"""``warren-mesh peer add|remove``: external members for meshes without Kubernetes (where a MeshPeer would do).

``add`` gives the peer an address of the mesh network the way a node gets one: a claim under
``claims/<name>/overlay/`` (so no node takes it), checked to be the oldest after writing, then the peer record. Its
key pair is made here; the private key goes only into the configuration printed for the user, never into etcd.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from warren_mesh.admin.reading import read_view
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.view import MeshReader
from warren_mesh.store.base import Store
from warren_mesh.trust.fields import validate_name
from warren_mesh.trust.networks import usable_host_range
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import ExternalPeer, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.netaddr import IPAddress, IPNetwork

log = logging.getLogger(__name__)

_ATTEMPTS = 20  # addresses tried when nodes keep claiming the one we chose


class PeerError(RuntimeError):
    """The peer cannot be added or removed as asked; the message says why."""


def _taken(view: MeshReader) -> tuple[set[int], list[IPNetwork]]:
    """What of the mesh networks is taken: addresses held (claims) or used by nodes, and peers' routes."""
    held = {int(ipaddress.ip_address(s)) for s in view.reservations if "/" not in s}
    held.update(int(ip) for entry in view.nodes.values() for ip in entry.record.overlay_ips)
    routed = [network for entry in view.peers.values() for network in entry.record.allowed_ips]
    return held, routed


def _free_address(view: MeshReader, overlay: IPNetwork, skip: set[int]) -> IPAddress:
    """A free address of ``overlay``, from the top down: nodes start where their names hash to, so the top is as
    likely free as anywhere, and members stay easy to tell apart from nodes."""
    first, last = usable_host_range(overlay)
    held, routed = _taken(view)
    for candidate in range(last, max(first, last - 65536) - 1, -1):  # an IPv6 /64 is not searched to its end
        address = ipaddress.ip_address(candidate) if overlay.version == 4 else ipaddress.IPv6Address(candidate)
        if candidate not in held and candidate not in skip and not any(address in n for n in routed):
            return address
    raise PeerError(f"every address of the mesh network {overlay} is taken")


async def add(
    store: Store,
    schema: KeySchema,
    name: str,
    *,
    allowed_ips: Sequence[IPNetwork] = (),
    persistent_keepalive: int | None = None,
) -> tuple[NodeKey, tuple[IPAddress, ...]]:
    """Write peer ``name`` with a new key and a free address of each of the mesh's overlay networks; its key and
    the addresses."""
    try:
        validate_name(name)
    except RecordError as exc:
        raise PeerError(f"peer name: {exc}") from None
    view = await read_view(store, schema)
    if name in view.peers or await store.get(schema.peer(name)) is not None:
        raise PeerError(f"peer {name!r} exists already (warren-mesh peer remove {name} first)")
    if name in view.nodes or any(r.owner == name for r in view.reservations.values()):
        raise PeerError(f"{name!r} is a node of the mesh; choose another name for the peer")
    key = NodeKey.generate()
    addresses = []
    try:
        for overlay in view.config.overlay_cidrs:
            addresses.append(await _claim_address(store, schema, name, overlay))
    except PeerError:
        await store.delete_prefix(schema.claims_of(name))  # the address of the first family too
        raise
    hosts = tuple(ipaddress.ip_network(f"{a}/{a.max_prefixlen}") for a in addresses)
    record = ExternalPeer(name, key.public_key, (*hosts, *allowed_ips), None, persistent_keepalive)
    if await store.create(schema.peer(name), encode_json(record.to_json())) is not None:
        await store.delete_prefix(schema.claims_of(name))
        raise PeerError(f"peer {name!r} was added by someone else meanwhile")
    return key, tuple(addresses)


async def _claim_address(store: Store, schema: KeySchema, name: str, overlay: IPNetwork) -> IPAddress:
    """Claim a free address of ``overlay`` for ``name``: the oldest claim holds it, on every node."""
    tried: set[int] = set()
    view = await read_view(store, schema)
    for _ in range(_ATTEMPTS):
        address = _free_address(view, overlay, tried)
        tried.add(int(address))
        claim = schema.claim(name, str(address))
        if await store.create_all([(claim, b"", 0)]) is not None:
            continue
        # A node may have claimed the address since we listed.
        view = await read_view(store, schema)
        holder = view.reservations.get(str(address))
        if holder is None or holder.owner != name:
            await store.delete(claim)
            log.info("%s took %s meanwhile; trying another address", holder.owner if holder else "?", address)
            continue
        return address
    raise PeerError(f"no address of {overlay} stayed free in {_ATTEMPTS} tries; try again")


async def remove(store: Store, schema: KeySchema, name: str) -> None:
    """Delete peer ``name``'s record and its claims: every node drops it at once."""
    try:
        validate_name(name)
    except RecordError as exc:
        raise PeerError(f"peer name: {exc}") from None
    view = await read_view(store, schema)
    if name in view.nodes:
        raise PeerError(f"{name!r} is a node, not a peer")
    if not await store.delete(schema.peer(name)):
        raise PeerError(f"no peer {name!r} in the mesh")
    await store.delete_prefix(schema.claims_of(name))
