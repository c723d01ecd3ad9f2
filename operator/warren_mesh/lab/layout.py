"""How a lab is laid out and remembered: the names and addresses every part derives from its prefix, and the
state file that says which nodes it has.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from warren_mesh.lab import netns
from warren_mesh.lab.access import LabAccess

SUBNET = ipaddress.ip_network("192.168.240.0/24")
SUBNET6 = ipaddress.ip_network("fd00:240::/64")  # the underlay's IPv6 half (ULA)
NAT_SUBNET = "10.231.{index}.0/24"  # behind node i's NAT: the NAT .1, the node .2
# A location's own network (lab up --locations): the k-th location's bridge in the hub, the hub .1, node i .10+i.
LOCATION_SUBNET = "10.232.{k}.0/24"
HUB_ADDRESS = "192.168.240.1"
HUB_ADDRESS6 = "fd00:240::1"
UNDERLAYS = ("ipv4", "ipv6", "dual")  # what a lab node's underlay has
# The lab's overlays: what `lab up --overlay` writes as the mesh's networks (ipv4: the mesh's defaults).
OVERLAYS = {
    "ipv4": {},
    "ipv6": {"overlay_cidrs": ["fd96::/64"], "pod_cidrs": ["fd44::/56"]},
    "dual": {"overlay_cidrs": ["10.96.0.0/16", "fd96::/64"], "pod_cidrs": ["10.244.0.0/16", "fd44::/56"]},
}
ETCD_PORT = 2379
METRICS_PORT = 9587


class LabError(RuntimeError):
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces and WireGuard devices: run it as root (sudo)")


class LabLayout:
    def __init__(self, prefix: str = "wmlab", state_dir: Path | None = None) -> None:
        if not prefix.isalnum() or len(prefix) > 8:
            raise LabError(f"lab prefix {prefix!r} must be at most 8 letters or digits")
        self.prefix = prefix
        self.state_dir = state_dir or Path("/run/warren-mesh-lab") / prefix
        self.hub = f"{prefix}-hub"
        self.bridge = f"{prefix}br"

    def node_netns(self, index: int) -> str:
        return f"{self.prefix}-node{index}"

    def interface(self, index: int) -> str:
        return f"{self.prefix}{index}"

    @staticmethod
    def node_name(index: int) -> str:
        return f"node-{index}"

    def cni_dir(self, index: int) -> Path:
        """Where node ``index``'s agent writes its CNI network config (a real node's /etc/cni/net.d)."""
        return self.state_dir / "cni" / self.node_name(index)

    def pod_netns(self, index: int, pod: str) -> str:
        return f"{self.prefix}-n{index}-{pod}"

    @staticmethod
    def underlay_ip(index: int) -> str:
        return str(SUBNET.network_address + 10 + index)

    @staticmethod
    def underlay_ip6(index: int) -> str:
        return str(SUBNET6.network_address + 0x10 + index)

    def underlay(self, index: int) -> str:
        """Node ``index``'s underlay: ipv4, ipv6 or dual."""
        underlays = self._load().get("underlay", {})
        assert isinstance(underlays, dict)
        return str(underlays.get(str(index), "ipv4"))

    def shares_underlay(self, a: int, b: int) -> bool:
        """Whether nodes ``a`` and ``b`` have an underlay family in common (and so can dial each other)."""
        first, second = self.underlay(a), self.underlay(b)
        return first == second or "dual" in (first, second)

    def underlay_ips(self, index: int) -> tuple[str, ...]:
        """Node ``index``'s underlay addresses, one per family of its underlay, IPv4 first."""
        underlay = self.underlay(index)
        return tuple(
            address
            for family, address in (("ipv4", self.underlay_ip(index)), ("ipv6", self.underlay_ip6(index)))
            if underlay in (family, "dual")
        )

    def located(self) -> bool:
        """Whether this lab's nodes are in locations (lab up --locations)."""
        return bool(self._load().get("placement"))

    def blocked(self) -> bool:
        """Whether some pair of nodes cannot reach each other (LabLocations.block)."""
        return bool(self._load().get("blocked"))

    def location(self, index: int) -> str | None:
        """Node ``index``'s location (lab up --locations), or None."""
        place = self._placement(index)
        return str(place[0]) if place else None

    def has_external(self, index: int) -> bool:
        """Whether node ``index`` is on the shared "WAN" bridge too (its location's gateway candidates are)."""
        place = self._placement(index)
        return not place or bool(place[2])

    def location_bridge(self, k: int) -> str:
        return f"{self.prefix}b{k}"

    def internal_ip(self, index: int) -> str:
        """Node ``index``'s address on its location's network (its underlay address when it has no location)."""
        place = self._placement(index)
        if not place:
            return self.underlay_ip(index)
        return str(ipaddress.ip_network(LOCATION_SUBNET.format(k=place[1])).network_address + 10 + index)

    def _placement(self, index: int) -> list[object]:
        """[location, its number k, whether external] of a located node; [] for one without a location."""
        placed = self._load().get("placement", {})
        assert isinstance(placed, dict)
        place = placed.get(str(index), [])
        assert isinstance(place, list)
        return place

    @property
    def tls(self) -> bool:
        """Whether this lab's etcd speaks TLS and asks every client for a certificate (the default)."""
        return bool(self._load().get("tls", False))

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def etcd_endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HUB_ADDRESS}:{ETCD_PORT}"

    @property
    def etcd_endpoint6(self) -> str:
        """etcd at the hub's IPv6 address: for nodes whose underlay is IPv6 only."""
        return f"{'https' if self.tls else 'http'}://[{HUB_ADDRESS6}]:{ETCD_PORT}"

    def access(self, index: int | None = None) -> LabAccess:
        """How a command reaches this lab's etcd: the endpoint and, with TLS, whose certificate (``index``: from
        that node, over its underlay)."""
        endpoint = self.etcd_endpoint6 if index is not None and self.underlay(index) == "ipv6" else self.etcd_endpoint
        return LabAccess(endpoint, self.pki_dir if self.tls else None)

    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load(self) -> dict[str, object]:
        try:
            loaded = json.loads(self._state_file().read_text())
        except (FileNotFoundError, ValueError):
            return {"nodes": {}, "backend": "auto", "lease_ttl": 5}
        assert isinstance(loaded, dict)
        return loaded

    def _save(self, state: dict[str, object]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state_file().write_text(json.dumps(state, indent=2))

    def nodes(self) -> list[int]:
        nodes = self._load()["nodes"]
        assert isinstance(nodes, dict)
        return sorted(int(i) for i in nodes)

    def is_up(self) -> bool:
        return self.hub in netns.listnetns_names()

    @staticmethod
    def _index_of_name(node: str, nodes: int) -> int:
        """``node-3`` (or ``3``) of a lab of ``nodes`` nodes, before they exist."""
        number = node.removeprefix("node-")
        if not number.isdigit() or not 1 <= int(number) <= nodes:
            raise LabError(f"--nat {node!r}: not one of node-1 .. node-{nodes}")
        return int(number)

    def _index_of(self, node: str) -> int:
        for index in self.nodes():
            if node in (self.node_name(index), str(index), self.node_netns(index)):
                return index
        raise LabError(f"no node {node!r} in this lab (nodes: {', '.join(self.node_name(i) for i in self.nodes())})")
