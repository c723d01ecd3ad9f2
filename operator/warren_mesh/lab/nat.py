"""Nodes behind NAT, and the underlay's MTU and rate: what makes the lab's network like the ones users have."""

from __future__ import annotations

import subprocess

from pyroute2 import IPRoute

from warren_mesh.lab.layout import (
    LabError,
    LabLayout,
)


class LabNat(LabLayout):
    def nat_netns(self, index: int) -> str:
        return f"{self.prefix}-nat{index}"

    def behind_nat(self) -> set[int]:
        """The nodes behind a NAT of their own (``up(nat=...)``)."""
        nat = self._load().get("nat", [])
        return {int(i) for i in nat} if isinstance(nat, list) else set()

    def _nat_rules(self, index: int, port: int | None = None) -> None:
        """A home router: outgoing connections masqueraded behind its address (keeping the port, unless ``port``
        says which), nothing unsolicited let in. Dropping what is unsolicited before conntrack confirms it also
        keeps the NAT from taking a port for it (which would make it give the node's next packets another)."""
        outside, inside = f"{self.prefix}v{index}o", f"{self.prefix}v{index}i"
        # A port asked for applies to UDP (WireGuard); etcd's TCP connection keeps the usual masquerade.
        masquerade = (
            "masquerade" if port is None else f'meta l4proto udp masquerade to :{port}; oifname "{outside}" masquerade'
        )
        ruleset = (
            "table ip lab-nat\n"
            "delete table ip lab-nat\n"
            "table ip lab-nat {\n"
            f'  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "{outside}" {masquerade}; }}\n'
            "  chain input { type filter hook input priority 0; policy drop; ct state established,related accept; }\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy drop;\n"
            "    ct state established,related accept;\n"
            f'    iifname "{inside}" oifname "{outside}" accept;\n'
            "  }\n"
            "}\n"
        )
        ns = self.nat_netns(index)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise LabError(f"the NAT of node-{index} could not be set up: {done.stderr.strip()}")

    def rebind_nat(self, index: int, port: int) -> None:
        """Node ``index``'s NAT forgets its mappings and maps the node's traffic to ``port`` from now on (a home
        router restarted, a carrier-grade NAT that timed out): its peers see it at a new endpoint."""
        self._nat_rules(index, port)
        subprocess.run(
            ["ip", "netns", "exec", self.nat_netns(index), "conntrack", "-F"], capture_output=True, check=True
        )

    def set_underlay(self, index: int, *, mtu: int | None = None, rate: str | None = None) -> None:
        """Make node ``index``'s link to the hub what a physical one might be: its ``mtu`` on both ends, and
        ``rate`` (tc's units: ``1gbit``) enforced by tbf on both ends, as a link of that speed would."""
        ends = ((self.node_netns(index), f"{self.prefix}v{index}n"), (self.hub, f"{self.prefix}v{index}h"))
        for ns, dev in ends:
            with IPRoute(netns=ns) as ipr:
                if mtu is not None:
                    ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], mtu=mtu)
            if rate is not None:
                tbf = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate]
                subprocess.run(
                    ["ip", "netns", "exec", ns, *tbf, "burst", "256kb", "latency", "50ms"],
                    capture_output=True,
                    check=True,
                )
