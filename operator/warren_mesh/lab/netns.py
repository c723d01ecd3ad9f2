"""Network namespaces, veth pairs and bridges for the lab and the tests, through pyroute2.

Everything made here is named with a caller-chosen prefix, so ``remove_all`` can find and delete exactly what a
lab or a test made, also after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD


def create(name: str) -> None:
    netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (the kernel's view, like `ip netns pids`)."""
    target = os.stat(os.path.join(netns.NETNS_RUN_DIR, name)).st_ino
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    found.append(int(entry))
    return found


def remove(name: str) -> None:
    """Kill what runs inside, then delete the namespace (its links go with it)."""
    if name not in netns.listnetns():
        return
    with contextlib.suppress(FileNotFoundError):
        for pid in pids_in(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids_in(name) and time.monotonic() < deadline:
            time.sleep(0.05)
    netns.remove(name)


def remove_all(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with ``prefix``; returns their names."""
    names = [n for n in netns.listnetns() if n.startswith(prefix)]
    for name in names:
        remove(name)
    return names


def veth(name: str, peer: str, *, ns: str | None, peer_ns: str | None) -> None:
    """A veth pair with one end in ``ns`` and the other in ``peer_ns`` (None: the current namespace)."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer=peer)
        for ifname, target in ((name, ns), (peer, peer_ns)):
            if target is not None:
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], net_ns_fd=target)


def bridge(name: str, *, ns: str) -> None:
    """A bridge with a MAC address of its own (locally administered, from its name). Without one, Linux gives a
    bridge the lowest MAC of its ports: a node attached later could change it, and nodes that had the old one in
    their neighbour tables (the hub's, where etcd listens) sent into the void until it aged out, some 30 s."""
    digest = hashlib.sha256(f"{ns}/{name}".encode()).digest()
    mac = ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname=name, kind="bridge", address=mac)
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def attach(ifname: str, bridge_name: str, *, ns: str) -> None:
    with IPRoute(netns=ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, master=ipr.link_lookup(ifname=bridge_name)[0])
        ipr.link("set", index=index, state="up")


def address(ifname: str, cidr: str, *, ns: str) -> None:
    ip, _, prefixlen = cidr.partition("/")
    with IPRoute(netns=ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        try:
            # IPv6: no duplicate address detection (nothing else is on the lab's links), so the address is usable
            # at once rather than "tentative" for a second or two.
            flags = IFA_F_NODAD if ":" in ip else 0
            ipr.addr("add", index=index, address=ip, prefixlen=int(prefixlen), flags=flags)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise
        ipr.link("set", index=index, state="up")


def listnetns_names() -> list[str]:
    return list(netns.listnetns())
