"""The kernel backend against kernel WireGuard: a large device reads back whole (every netlink chunk merged).

Runs where the kernel has WireGuard: inside the QEMU VM (test_kernel_vm.py runs every test named *kernel* there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from warren_mesh.identity.keys import NodeKey
from warren_mesh.values.device import InterfaceSpec, PeerSpec

pytestmark = pytest.mark.kernel_wireguard

PEERS = 300


@pytest.fixture
def backend() -> Iterator[object]:
    from warren_mesh.wireguard.kernel import KernelBackend

    device = KernelBackend(f"wmk{os.getpid() % 10000}")
    try:
        yield device
    finally:
        device.close(remove_device=True)


def test_kernel_backend_reads_every_chunk(backend: object) -> None:
    from warren_mesh.wireguard.kernel import KernelBackend

    assert isinstance(backend, KernelBackend)
    key = NodeKey.generate()
    backend.set_private_key(key)
    backend.configure_interface(InterfaceSpec(("10.96.0.1/16",), 51820, 1420, fwmark=0x51))
    wanted = {}
    for i in range(PEERS):
        spec = PeerSpec(
            NodeKey.generate().public_key,
            f"192.0.2.{i % 250 + 1}:{20000 + i}",
            tuple(sorted((f"10.96.{i // 250 + 1}.{i % 250 + 1}/32", f"10.{100 + i // 250}.{i % 250}.0/24"))),
            25,
        )
        backend.set_peer(spec)
        wanted[spec.public_key] = spec
    device = backend.read()
    assert device.public_key == key.public_key
    assert device.interface == InterfaceSpec(("10.96.0.1/16",), 51820, 1420, fwmark=0x51)
    assert len(device.peers) == PEERS, "a dump of this size spans several netlink messages"
    assert dict(device.peers) == wanted
    # One peer removed, one updated in place: nothing else changes.
    first, second = list(wanted)[:2]
    backend.remove_peer(wanted[first])
    moved = PeerSpec(second, "192.0.2.99:40000", wanted[second].allowed_ips, 10)
    backend.set_peer(moved)
    after = backend.read().peers
    assert first not in after and after[second] == moved and len(after) == PEERS - 1
    # Networks added to a peer join the ones it has (no replace flag: it never has none for a moment), and an
    # endpoint change alone leaves them as they are.
    grown = PeerSpec(second, moved.endpoint, tuple(sorted((*moved.allowed_ips, "fd96::2/128"))), 10)
    backend.set_peer(grown, adding=("fd96::2/128",))
    assert backend.read().peers[second] == grown
    roamed = PeerSpec(second, "192.0.2.98:40001", grown.allowed_ips, 10)
    backend.set_peer(roamed, adding=())
    assert backend.read().peers[second] == roamed


def test_kernel_routes_follow_a_replaced_link(backend: object) -> None:
    """The backend remembers the link's index for routing; a link replaced behind its back (deleted and created
    again by someone else) costs at most one failed change, after which routes go through the new link."""
    from pyroute2 import IPRoute

    from warren_mesh.wireguard.backend import BackendError
    from warren_mesh.wireguard.kernel import KernelBackend

    assert isinstance(backend, KernelBackend)
    name = backend.interface_name
    backend.configure_interface(InterfaceSpec(("10.96.0.1/16",), 51820, 1420))
    peer = PeerSpec(NodeKey.generate().public_key, "192.0.2.1:51820", ("10.96.0.2/32", "10.244.7.0/24"), 0)
    backend.set_peer(peer)
    backend.add_route("10.244.7.0/24")
    assert backend.read().routes == {"10.244.7.0/24"}
    with IPRoute() as ipr:
        old_index = ipr.link_lookup(ifname=name)[0]
        assert [r.get("RTA_OIF") for r in ipr.get_routes(dst="10.244.7.1")] == [old_index]
        ipr.link("del", index=old_index)
        ipr.link("add", ifname=name, kind="wireguard")
        new_index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=new_index, state="up")
    assert new_index != old_index
    try:
        backend.add_route("10.244.7.0/24")
    except BackendError:  # the remembered index was stale: this change failed, the next one reads the link anew
        backend.add_route("10.244.7.0/24")
    with IPRoute() as ipr:
        assert [r.get("RTA_OIF") for r in ipr.get_routes(dst="10.244.7.1")] == [new_index]
