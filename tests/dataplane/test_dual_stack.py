"""Dual-stack and IPv6 underlays with real agents and wireguard-go in the lab: every node and every pod reached
over both overlay families, only WireGuard on the underlay, the IPv6 overhead in the MTU, and a mesh where some
pairs share no underlay family says so instead of dialling for ever."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from underlay import Frame, captured, sniff
from warren_mesh.agent.reachability import NO_HANDSHAKE_AFTER
from warren_mesh.lab.lab import Lab
from warren_mesh.lab.layout import METRICS_PORT, OVERLAYS
from warren_mesh.lab.probe import Probe
from warren_mesh.process import in_netns
from warren_mesh.testkit.waiting import wait_for

TTL = 3
ICMP = (1, 58)  # ICMP, ICMPv6


def _underlay_frames(lab: Lab, action: object) -> list[Frame]:
    """What crosses node-1's link (from the hub's side) while ``action`` runs."""
    sniffer = sniff(f"{lab.prefix}v1h", 60, preexec_fn=in_netns(lab.hub))
    time.sleep(0.5)
    assert callable(action)
    action()
    time.sleep(0.3)
    return captured(sniffer, stop=True)


def _ping(lab: Lab, node: int, address: str, *, size: int = 56) -> bool:
    """One ping of ``size`` bytes of data that must not be fragmented (-M do)."""
    argv = lab.exec_argv(lab.node_name(node), ["ping", "-c", "1", "-W", "3", "-M", "do", "-s", str(size), address])
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _metric(lab: Lab, node: int, name: str) -> float:
    """A metric of node ``node``'s agent, over the underlay (from the hub, which has both families)."""
    address = lab.underlay_ips(node)[0]
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{METRICS_PORT}/metrics"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    argv = ["ip", "netns", "exec", lab.hub, sys.executable, "-c", fetch]
    text = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in node-{node}'s metrics")


def _all_answer(lab: Lab, node_pairs: int, pod_pairs: int) -> None:
    """Every node pings every node it shares an underlay family with, and every pod every such pod, on each
    address. The first pings after the lab came up may go unanswered for a moment: usually 0.1-0.2 s; up to 2.2 s
    seen on the mixed underlay's IPv6 pairs (not explained yet: issue 29's note). Within 20 s every one must
    answer, and the time it took is printed."""
    started = time.monotonic()
    failed: list[object] = []

    def answered() -> bool:
        nodes, pods = lab.ping_all(), lab.ping_pods()
        failed[:] = [result for result in (*nodes, *pods) if not result[2]]
        assert (len(nodes), len(pods)) == (node_pairs, pod_pairs), (nodes, pods)
        return not failed

    wait_for(answered, 20, "every node and pod to answer on every address", lambda: str(failed))
    print(f"every ping answered {time.monotonic() - started:.1f} s after the lab was up")


def _endpoints(lab: Lab, node: int) -> set[str]:
    return {endpoint for endpoint, _, _ in lab.peer_config(node).values()}


@pytest.mark.parametrize("underlay", ["dual", "ipv6"])
def test_every_node_and_pod_is_reached_over_both_overlay_families(lab: Lab, underlay: str) -> None:
    """A dual-stack overlay and pod network on a dual-stack underlay (peers dial IPv4, the shared family with less
    overhead) and on an IPv6-only one (etcd, endpoints, everything over IPv6). On kernel WireGuard (the QEMU VM):
    tests/dataplane/test_lab.py's pod scenario, dual-stack on both data planes."""
    lab.up(3, backend="userspace", lease_ttl=TTL, timeout=120, pods=1, underlay=underlay, overlay="dual")
    status = lab.status()
    assert all(len(node.overlay_ips) == 2 for node in status), status
    assert {":" in address for node in status for address in node.overlay_ips} == {True, False}
    pods = lab.pods()
    assert all(len(pod.ips) == 2 for pod in pods), pods
    family = "[" if underlay == "ipv6" else "192.168."
    assert all(e.startswith(family) for e in _endpoints(lab, 1)), lab.peer_config(1)

    frames = _underlay_frames(lab, lambda: _all_answer(lab, 6, 6))
    wireguard = [f for f in frames if f.protocol == 17 and 51820 in (f.sport, f.dport)]
    assert wireguard, "the pings crossed as WireGuard"
    assert all((":" in f.source) == (underlay == "ipv6") for f in wireguard), wireguard[:3]
    in_clear = [f for f in frames if f.protocol in ICMP]
    assert not in_clear, f"pings crossed the underlay in the clear: {in_clear[:3]}"

    # mtu auto: a node that peers may dial over IPv6 takes IPv6's 80 bytes of overhead (1500 - 80); a packet of
    # the full MTU crosses whole, one larger is refused rather than fragmented.
    assert lab.status() and _device_mtu(lab, 1) == 1420
    target = status[1].overlay_ips[1]  # node-2's IPv6 overlay address
    frames = _underlay_frames(lab, lambda: _assert(_ping(lab, 1, target, size=1420 - 48)))
    assert not any(f.fragment for f in frames), [f for f in frames if f.fragment][:3]
    assert not _ping(lab, 1, target, size=1420 - 48 + 1)


def _assert(value: bool) -> None:
    assert value


def _device_mtu(lab: Lab, node: int) -> int:
    argv = lab.exec_argv(lab.node_name(node), ["cat", f"/sys/class/net/{lab.interface(node)}/mtu"])
    return int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def test_pairs_without_a_shared_underlay_family_are_reported_and_relayed(lab: Lab) -> None:
    """node-1 dual-stack, node-2 IPv4 only, node-3 IPv6 only: 1-2 and 1-3 connect (over IPv4 and IPv6), 2-3 cannot
    dial each other and each of them says so; its peer is configured without an endpoint, so nothing is sent for it,
    and the pair reaches each other through node-1, which reaches both (docs/topology.md#relays)."""
    lab.up(
        3,
        backend="userspace",
        lease_ttl=TTL,
        timeout=120,
        pods=1,
        underlay="dual",
        underlay_of={"node-2": "ipv4", "node-3": "ipv6"},
        overlay="dual",
    )
    _all_answer(lab, 4, 4)
    assert {e.startswith("[") for e in _endpoints(lab, 1)} == {True, False}, lab.peer_config(1)
    assert _metric(lab, 2, "warren_mesh_unreachable_peers") == 1
    assert _metric(lab, 3, "warren_mesh_unreachable_peers") == 1
    assert _metric(lab, 1, "warren_mesh_unreachable_peers") == 0
    node2_peers = lab.peer_config(2)
    assert len(node2_peers) == 2 and sorted(e for e, _, _ in node2_peers.values())[0] == "(none)", node2_peers
    log = (lab.state_dir / "node-2.log").read_text()
    assert "no underlay family in common with node-3" in log
    # Relayed: node-1's peer on node-2 carries node-3's routes, and node-2 and node-3 ping each other through it.
    keys = {i: lab.public_key(i) for i in (1, 2, 3)}
    overlay3 = next(s.overlay_ips for s in lab.status() if s.name == "node-3")
    wait_for(
        lambda: all(f"{ip}/{32 if '.' in ip else 128}" in lab.peer_config(2)[keys[1]][1] for ip in overlay3),
        NO_HANDSHAKE_AFTER + 15,
        "node-2 to reach node-3 through node-1",
    )
    assert lab.peer_config(2)[keys[3]][1] == "(none)", "no allowed IPs on the peer it cannot dial"
    assert all(lab.ping(2, ip) for ip in overlay3) and all(lab.ping(3, ip) for ip in lab.status()[1].overlay_ips)
    dot = lab.graph().decode()  # drawn as such, not as a broken link
    assert '"node-2" -- "node-3" [color=orange, style=dashed, label="relayed through node-1"]' in dot, dot


@pytest.mark.alone
def test_a_single_family_mesh_gains_ipv6_by_a_config_edit_without_losing_a_datagram(lab: Lab) -> None:
    """Nodes registered on an IPv4 overlay; the mesh's config gains an IPv6 overlay and pod network (what an edit of
    the Mesh writes): every node claims an address and a pod subnet of the new family, peers route them, and
    traffic on the IPv4 overlay flows on, every datagram of it (the key rotation test's probe, 200/s per pair)."""
    lab.up(3, backend="userspace", lease_ttl=TTL, resync_interval=2, timeout=120, pods=1, underlay="dual")
    before = {n.name: n.overlay_ips for n in lab.status()}
    assert all(len(ips) == 1 for ips in before.values()), before
    probe = Probe({n.name: (n.netns, n.overlay_ips[0]) for n in lab.status()}, rate=200, seconds=8)
    probe.start()
    try:
        time.sleep(2)
        lab.put_config({"schema": 1, **OVERLAYS["dual"]})
        wait_for(
            lambda: all(len(n.overlay_ips) == 2 for n in lab.status()),
            20,
            "every node to take an IPv6 overlay address",
            lambda: str(lab.status()),
        )
        pairs = probe.results()
    finally:
        probe.stop()
    print("gaining IPv6, per directed pair (loss, longest gap ms):", pairs)
    assert all(loss == 0 and gap < 200 for loss, gap in pairs.values()), pairs
    after = {n.name: n.overlay_ips for n in lab.status()}
    assert all(after[name][0] == ips[0] for name, ips in before.items()), (before, after)  # nothing renumbered
    # Pods made from now on get an address of each family and reach each other over both.
    for node in ("node-1", "node-2"):
        pod = lab.add_pod(node, "pod-2")
        assert len(pod.ips) == 2, pod
    _all_answer(lab, 6, 16)
