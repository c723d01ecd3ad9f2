"""The node side of the pod network in a network namespace of the test's own: forwarding, the nftables table and
the CNI conflist are set once, left alone when in place, repaired when changed, and removed on cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from warren_mesh.lab import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and nftables need root")

# Runs inside the namespace: one call of the agent's own code, printing what it changed.
ENSURE = r"""
import ipaddress, json, logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from warren_mesh.host.pod_network import PodNetwork
from warren_mesh.host import forwarding
from warren_mesh.trust.records import MeshConfig
from warren_mesh.settings import PodSettings
settings = PodSettings(route=True, cni_conf_dir=Path(sys.argv[2]))
dual = sys.argv[3] == "dual"
subnets = ("10.244.9.0/24", "fd44:0:0:9::/64") if dual else ("10.244.9.0/24",)
network = PodNetwork(settings, subnets=tuple(ipaddress.ip_network(s) for s in subnets), interface="wgpod")
config = MeshConfig.from_json(
    {"schema": 1, "overlay_cidrs": ["10.96.0.0/16", "fd96::/64"], "pod_cidrs": ["10.244.0.0/16", "fd44::/56"]}
) if dual else MeshConfig()
if sys.argv[1] == "ensure":
    ok = network.ensure(config, 1420)
    print(json.dumps({"ok": ok}))
else:
    network.remove()
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[str]:
    name = f"wtpod{os.getpid() % 100000}"
    netns.create(name)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "add", "wgpod", "type", "veth", "peer", "name", "wgpodp"],
            check=True,
        )
        yield name
    finally:
        netns.remove(name)


def _in(node: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", node, *command], capture_output=True, text=True, check=False)


def _agent(node: str, action: str, cni_dir: Path, family: str = "ipv4") -> subprocess.CompletedProcess[str]:
    done = _in(node, sys.executable, "-c", ENSURE, action, str(cni_dir), family)
    assert done.returncode == 0, done.stderr
    return done


def test_forwarding_masquerade_and_conflist_are_kept_and_removed(node: str, tmp_path: Path) -> None:
    cni_dir = tmp_path / "net.d"
    _in(node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    first = _agent(node, "ensure", cni_dir)
    assert json.loads(first.stdout) == {"ok": True}
    assert "wrote" in first.stderr and "pod forwarding set" in first.stderr
    assert _in(node, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert _in(node, "sysctl", "-n", "net.ipv4.conf.wgpod.rp_filter").stdout.strip() == "2"
    ruleset = _in(node, "nft", "list", "table", "inet", "warren-mesh").stdout
    assert "ip saddr 10.244.9.0/24 ip daddr != { 10.96.0.0/16, 10.244.0.0/16 } masquerade" in ruleset
    # Connections through the tunnel never carry an MSS larger than its MTU allows (pods made before an MTU change).
    assert 'oifname "wgpod" tcp flags syn / syn,rst tcp option maxseg size set rt mtu' in ruleset
    conflist = json.loads((cni_dir / "10-warren-mesh.conflist").read_text())
    bridge = conflist["plugins"][0]
    assert bridge["mtu"] == 1420 and bridge["ipam"]["ranges"] == [
        [{"subnet": "10.244.9.0/24", "gateway": "10.244.9.1"}]
    ]
    stamp = (cni_dir / "10-warren-mesh.conflist").stat().st_mtime_ns

    # In place: nothing is written again.
    again = _agent(node, "ensure", cni_dir)
    assert "wrote" not in again.stderr and "pod forwarding set" not in again.stderr
    assert (cni_dir / "10-warren-mesh.conflist").stat().st_mtime_ns == stamp

    # A rule of someone else's in our table, or ours removed: the table is made again, as it should be.
    _in(node, "nft", "add", "rule", "inet", "warren-mesh", "postrouting", "counter")
    repaired = _agent(node, "ensure", cni_dir)
    assert "nftables table inet warren-mesh" in repaired.stderr
    assert "counter" not in _in(node, "nft", "list", "table", "inet", "warren-mesh").stdout

    # --cleanup-on-exit: the table and the conflist go; forwarding stays (others may rely on it).
    _agent(node, "remove", cni_dir)
    assert _in(node, "nft", "list", "table", "inet", "warren-mesh").returncode != 0
    assert not (cni_dir / "10-warren-mesh.conflist").exists()
    assert _in(node, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"


def test_a_dual_stack_node_forwards_and_masquerades_both_families_and_gives_pods_both(
    node: str, tmp_path: Path
) -> None:
    cni_dir = tmp_path / "net.d"
    _in(node, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0")
    first = _agent(node, "ensure", cni_dir, "dual")
    assert json.loads(first.stdout) == {"ok": True}, first.stderr
    assert _in(node, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    ruleset = _in(node, "nft", "list", "table", "inet", "warren-mesh").stdout
    assert "ip saddr 10.244.9.0/24 ip daddr != { 10.96.0.0/16, 10.244.0.0/16 } masquerade" in ruleset, ruleset
    assert "ip6 saddr fd44:0:0:9::/64 ip6 daddr != { fd44::/56, fd96::/64 } masquerade" in ruleset, ruleset
    ipam = json.loads((cni_dir / "10-warren-mesh.conflist").read_text())["plugins"][0]["ipam"]
    assert ipam["ranges"] == [
        [{"subnet": "10.244.9.0/24", "gateway": "10.244.9.1"}],
        [{"subnet": "fd44:0:0:9::/64", "gateway": "fd44:0:0:9::1"}],
    ]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    # The pods' bridge is there before the first pod, its IPv6 gateway and link-local usable at once (no duplicate
    # address detection: the first pod's IPv6 is not cut off for its ~2 s), and no address the kernel made.
    bridge = _in(node, "ip", "-6", "addr", "show", "dev", "wm-pods0").stdout
    assert "inet6 fd44:0:0:9::1/64" in bridge and "inet6 fe80::1/64" in bridge, bridge
    assert (
        bridge.count("inet6 ") == 2 and not _in(node, "ip", "-6", "addr", "show", "dev", "wm-pods0", "tentative").stdout
    ), bridge
    assert "addrgenmode none" in _in(node, "ip", "-d", "link", "show", "wm-pods0").stdout
    assert "inet 10.244.9.1/24" in _in(node, "ip", "-4", "addr", "show", "dev", "wm-pods0").stdout
    again = _agent(node, "ensure", cni_dir, "dual")  # three rules, each with the table's digest: in place
    assert "pod forwarding set" not in again.stderr and "wrote" not in again.stderr
    _agent(node, "remove", cni_dir, "dual")
    assert _in(node, "nft", "list", "table", "inet", "warren-mesh").returncode != 0
