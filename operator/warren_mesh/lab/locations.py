"""Labs whose nodes cannot all reach each other: locations with networks of their own, links cut, paths blocked.

With ``lab up --locations a:3:2,b:2`` each location has its own bridge in the hub (10.232.<k>.0/24) and its
nodes are on it only, except the first few of each (2 in location a, 1 by default), which are also on the
shared "WAN" bridge with the hub's etcd: their location's gateway candidates. The hub routes nothing between
bridges (its IP forwarding is off), so a location reaches another only through WireGuard between gateways; every
node reaches etcd at the hub's own address (delivered locally, never forwarded).
"""

from __future__ import annotations

import ipaddress
import subprocess

from pyroute2 import IPRoute

from warren_mesh.lab import netns
from warren_mesh.lab.layout import LOCATION_SUBNET, SUBNET, LabError, LabLayout
from warren_mesh.trust.node_fields import validate_location
from warren_mesh.trust.reasons import RecordError


def parse_locations(spec: str) -> dict[str, list[object]]:
    """``a:3:2,b:2`` (location:nodes[:with a WAN link, default 1]) as node index -> [location, k, external],
    numbering the nodes in the order given."""
    placement: dict[str, list[object]] = {}
    index = 0
    for k, part in enumerate((p.strip() for p in spec.split(",") if p.strip()), start=1):
        fields = part.split(":")
        try:
            location = validate_location(fields[0])
        except RecordError as exc:
            raise LabError(f"--locations {part!r}: {exc}") from None
        if not 2 <= len(fields) <= 3 or not all(f.isdigit() for f in fields[1:]):
            raise LabError(f"--locations {part!r} is not NAME:NODES or NAME:NODES:WITH_WAN")
        count, external = int(fields[1]), int(fields[2]) if len(fields) == 3 else 1
        if not 1 <= count <= 50 or not 0 <= external <= count:
            raise LabError(f"--locations {part!r}: 1-50 nodes, of which at most all have a WAN link")
        for n in range(count):
            index += 1
            placement[str(index)] = [location, k, n < external]
    if not placement:
        raise LabError(f"--locations {spec!r} names no location")
    return placement


class LabLocations(LabLayout):
    def _location_bridges(self) -> None:
        """Each location's bridge in the hub, with the hub's address on it; the hub forwards nothing."""
        placement = self._load().get("placement", {})
        assert isinstance(placement, dict)
        for k in sorted({int(str(place[1])) for place in placement.values()}):
            bridge = self.location_bridge(k)
            netns.bridge(bridge, ns=self.hub)
            network = ipaddress.ip_network(LOCATION_SUBNET.format(k=k))
            netns.address(bridge, f"{network.network_address + 1}/{network.prefixlen}", ns=self.hub)
        subprocess.run(["ip", "netns", "exec", self.hub, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=True)

    def _located_links(self, index: int, ns: str) -> str:
        """Node ``index``'s links: to its location's bridge, and to the WAN bridge if it has a WAN link; its
        default route's gateway (the hub on its location's bridge)."""
        place = self._placement(index)
        k = int(str(place[1]))
        network = ipaddress.ip_network(LOCATION_SUBNET.format(k=k))
        node_side, hub_side = f"{self.prefix}v{index}n", f"{self.prefix}v{index}h"
        netns.veth(node_side, hub_side, ns=ns, peer_ns=self.hub)
        netns.attach(hub_side, self.location_bridge(k), ns=self.hub)
        netns.address(node_side, f"{self.internal_ip(index)}/{network.prefixlen}", ns=ns)
        if self.has_external(index):
            wan, hub_wan = self._wan_link(index), f"{self.prefix}v{index}x"
            netns.veth(wan, hub_wan, ns=ns, peer_ns=self.hub)
            netns.attach(hub_wan, self.bridge, ns=self.hub)
            netns.address(wan, f"{self.underlay_ip(index)}/{SUBNET.prefixlen}", ns=ns)
        return str(network.network_address + 1)

    def _wan_link(self, index: int) -> str:
        return f"{self.prefix}v{index}w"

    def set_wan(self, index: int, *, up: bool) -> None:
        """Cut (or restore) node ``index``'s WAN link alone: the node, its agent and its location's network stay
        up, etcd stays reachable (through the hub on its location's network), only other locations are out of reach
        (Kilo #489)."""
        if not self.has_external(index) or not self.location(index):
            raise LabError(f"node-{index} has no WAN link of its own (lab up --locations NAME:NODES:WITH_WAN)")
        with IPRoute(netns=self.node_netns(index)) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=self._wan_link(index))[0], state="up" if up else "down")

    def isolate(self, index: int) -> None:
        """Node ``index`` falls off every network (a power cut, as its peers see it): every link of its down."""
        with IPRoute(netns=self.node_netns(index)) as ipr:
            for found in ipr.get_links():
                name = found.get_attr("IFLA_IFNAME")
                if name.startswith(f"{self.prefix}v{index}"):
                    ipr.link("set", index=found["index"], state="down")

    def block(self, a: int, b: int, *, blocked: bool = True) -> None:
        """Drop (or let through again) every packet between nodes ``a`` and ``b`` on the hub's bridge: a firewall
        between two nodes that both still reach everyone else."""
        listed = self._load().get("blocked", [])
        assert isinstance(listed, list)
        pairs: set[tuple[int, int]] = {(int(p[0]), int(p[1])) for p in listed}
        pair = (min(a, b), max(a, b))
        pairs = pairs | {pair} if blocked else pairs - {pair}
        rules = "".join(
            f"    ip saddr {self.underlay_ip(x)} ip daddr {self.underlay_ip(y)} drop;\n"
            f"    ip saddr {self.underlay_ip(y)} ip daddr {self.underlay_ip(x)} drop;\n"
            for x, y in sorted(pairs)
        )
        ruleset = (
            "table bridge lab-block\ndelete table bridge lab-block\ntable bridge lab-block {\n"
            f"  chain forward {{\n    type filter hook forward priority 0;\n{rules}  }}\n}}\n"
        )
        argv = ["ip", "netns", "exec", self.hub, "nft", "-f", "-"]
        done = subprocess.run(argv, input=ruleset, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LabError(f"blocking node-{a} <-> node-{b} failed: {done.stderr.strip()}")
        state = self._load()
        state["blocked"] = [list(p) for p in sorted(pairs)]
        self._save(state)
