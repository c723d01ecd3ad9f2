"""Choosing the data plane: the kernel's WireGuard when it is there, wireguard-go otherwise (ADR-003)."""

from __future__ import annotations

import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from warren_mesh.wireguard.backend import Backend
from warren_mesh.wireguard.kernel import KernelBackend
from warren_mesh.wireguard.memory import MemoryBackend
from warren_mesh.wireguard.userspace import UserspaceBackend

log = logging.getLogger(__name__)


def kernel_wireguard_available() -> tuple[bool, str]:
    """Try to create (and delete) a WireGuard link: the only reliable test that the kernel can do it."""
    name = f"wmprobe{os.getpid() % 100000}"
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="wireguard")
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    except NetlinkError as exc:
        return False, f"the kernel cannot create a WireGuard link ({exc.args[-1] if exc.args else exc})"
    return True, "the kernel created a WireGuard link"


def create_backend(
    kind: str, interface: str, *, wireguard_go: str | None = None, start_wireguard_go: bool = True
) -> Backend:
    """``wireguard_go``: the userspace backend's binary (None: the one on PATH); ``start_wireguard_go``: False where
    `warren-mesh wireguard-go` runs it (the userspace backend then adopts the daemon only)."""
    if kind == "memory":
        return MemoryBackend(interface_name=interface)
    if kind == "userspace":
        return UserspaceBackend(interface, binary=wireguard_go, start_daemon=start_wireguard_go)
    if kind == "kernel":
        return KernelBackend(interface)
    available, why = kernel_wireguard_available()
    if available:
        log.info("backend auto: %s; using kernel WireGuard", why)
        return KernelBackend(interface)
    log.info("backend auto: %s; using wireguard-go (userspace)", why)
    return UserspaceBackend(interface, binary=wireguard_go, start_daemon=start_wireguard_go)
