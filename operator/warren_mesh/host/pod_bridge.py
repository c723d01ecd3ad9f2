"""The pods' bridge, made by the agent before the first pod rather than by the CNI bridge plugin on it.

The bridge plugin creates the bridge when the first pod of a node starts and gives it the gateway address of each
of the node's pod subnets. An IPv6 address added so goes through duplicate address detection: for one to two
seconds it is "tentative", and neither the pods' neighbour discovery of their gateway nor the node's of its pods
gets an answer, so the first pod's IPv6 is cut off for that long after it started (measured in the lab: 2.1 s).
Made here, beforehand, with the gateway addresses added without detection (nothing else on a node's own bridge can
hold them), the bridge is ready when the first pod comes; the plugin finds the same addresses and leaves them.
So is its link-local address, which the node's neighbour solicitations to its pods come from: a bridge starts the
detection of the one the kernel makes only when its first port appears (the first pod again), so the kernel makes
none (addrgenmode none) and the bridge gets fe80::1 without detection (the link is the node's own).
Its MTU is left alone: a bridge not given one follows its ports, which the plugin makes at the conflist's MTU.
"""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from warren_mesh.host import cni
from warren_mesh.values.netaddr import IPNetwork

LINK_LOCAL = "fe80::1/64"
_NO_LINK_LOCAL = {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}  # IN6_ADDR_GEN_MODE_NONE


class PodBridgeError(RuntimeError):
    """The bridge could not be made or given its addresses; the message says what failed."""


def ensure(name: str, subnets: tuple[IPNetwork, ...]) -> list[str]:
    """Make bridge ``name`` with the gateway address of each of ``subnets``, up; what had to change."""
    changed: list[str] = []
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            ipv6 = any(subnet.version == 6 for subnet in subnets)
            if not found:
                ipr.link("add", ifname=name, kind="bridge")
                found = ipr.link_lookup(ifname=name)
                changed.append(f"bridge {name}")
                if ipv6:
                    ipr.link("set", index=found[0], IFLA_AF_SPEC={"attrs": [["AF_INET6", _NO_LINK_LOCAL]]})
            index = found[0]
            have = {
                ipaddress.ip_interface(f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}")
                for entry in ipr.get_addr(index=index)
            }
            wanted = [f"{cni.gateway(subnet)}/{subnet.prefixlen}" for subnet in subnets]
            for text in (*wanted, *((LINK_LOCAL,) if ipv6 else ())):
                address = ipaddress.ip_interface(text)
                if address not in have:
                    flags = IFA_F_NODAD if address.version == 6 else 0
                    prefixlen = address.network.prefixlen
                    ipr.addr("add", index=index, address=str(address.ip), prefixlen=prefixlen, flags=flags)
                    changed.append(f"{name} {address}")
            if not int(ipr.get_links(index)[0]["flags"]) & 1:  # IFF_UP
                ipr.link("set", index=index, state="up")
    except NetlinkError as exc:
        raise PodBridgeError(f"cannot make the pods' bridge {name}: {exc}") from None
    return changed
