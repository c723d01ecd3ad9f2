#!/usr/bin/env python3
"""Data-plane throughput in one run: native underlay, a hand-configured wireguard-go tunnel, and the lab's mesh.

    sudo .venv/bin/python hack/throughput.py [--seconds 5] [--rounds 3] [--link-rate 1gbit] [--underlay ipv6]
        [--wireguard-go PATH ...]

Prints one JSON line: native_gbps, manual_wg_gbps, mesh_gbps, pod_gbps (iperf3 between a pod on each node, through
the CNI bridge and the tunnel), mesh_vs_manual, tunnel_vs_native, pod_vs_tunnel, link_rate, ceiling_ratio (the
most any tunnel can carry relative to native on this link, from the MTUs), tunnel_vs_ceiling,
wireguard_go_version (plus the per-round figures and the machine). ``--link-rate`` shapes the underlay (tbf on both
ends of both nodes' veth pairs, for native and tunnel alike), as a physical link of that rate would.
``--underlay ipv6``: the nodes' underlay is IPv6 only (native, the hand-made tunnel and the mesh's all cross it;
WireGuard's overhead is 80 bytes there, not 60).

All of them cross the same path (two lab namespaces joined by the lab's bridge): native over the underlay
addresses, the hand-made tunnel on its own port and subnet, the mesh's tunnel, and the pods over the mesh. They
are measured back to back with iperf3 (one TCP stream), each round interleaved so that machine noise hits them
alike; the median of the rounds is reported. The point of mesh_vs_manual is that the control plane costs the data
plane nothing: the mesh's tunnel is the same wireguard-go, configured by the agent instead of by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

import results
from warren_mesh.identity.keys import NodeKey
from warren_mesh.lab.lab import Lab
from warren_mesh.wireguard.uapi import SOCKET_DIR
from warren_mesh.wireguard.userspace import find_wireguard_go, wireguard_go_version

TAG = f"wtp{os.getpid() % 10000}"
MANUAL_PORT = 51900


def sh(ns: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *command], capture_output=True, text=True, check=check)


def measure(server_ns: str, client_ns: str, address: str, seconds: float) -> float:
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            run = sh(client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J", check=False)
            try:
                report = json.loads(run.stdout)
                return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
            except (ValueError, KeyError):
                pass  # an error report: most likely the server was not listening yet
            if time.monotonic() > deadline:
                raise SystemExit(f"iperf3 to {address} failed: {run.stdout[-300:]} {run.stderr[-300:]}")
            time.sleep(0.1)  # the server is not listening yet
    finally:
        server.kill()
        server.wait()


def setup_manual(lab: Lab, binary: str, mtu: int, ipv6: bool) -> str:
    """A second wireguard-go tunnel between the lab's node-1 and node-2, configured by hand (ip and wg, as a user
    would) with the same binary and MTU as the mesh's, on its own port and subnet: it crosses exactly the underlay
    the mesh crosses. Returns node-2's address."""
    keys = NodeKey.generate(), NodeKey.generate()
    env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
    with tempfile.TemporaryDirectory() as tmp:
        for i, index in enumerate((1, 2)):
            ns, iface, other = lab.node_netns(index), f"{TAG}w{i}", (2, 1)[i]
            subprocess.run(["ip", "netns", "exec", ns, binary, iface], env=env, check=True, capture_output=True)
            key_file = Path(tmp) / f"k{i}"
            key_file.write_text(keys[i].private_base64())
            sh(
                ns,
                "wg",
                "set",
                iface,
                "listen-port",
                str(MANUAL_PORT),
                "private-key",
                str(key_file),
                "peer",
                keys[1 - i].public_key,
                "endpoint",
                f"[{lab.underlay_ip6(other)}]:{MANUAL_PORT}" if ipv6 else f"{lab.underlay_ip(other)}:{MANUAL_PORT}",
                "allowed-ips",
                f"10.98.0.{other}/32",
            )
            sh(ns, "ip", "address", "add", f"10.98.0.{index}/24", "dev", iface)
            sh(ns, "ip", "link", "set", iface, "mtu", str(mtu), "up")
    return "10.98.0.2"


def ceiling_ratio(underlay_mtu: int, tunnel_mtu: int, ipv6: bool = False) -> float:
    """The most a tunnel can carry relative to native on a link counted by the frame (tbf sees the 14-byte Ethernet
    header): a native TCP segment carries underlay_mtu - 40 bytes in underlay_mtu + 14 (- 60 over IPv6); a tunnel
    one (IPv4 inside) carries tunnel_mtu - 40 in tunnel_mtu + 60 (WireGuard over IPv4 and UDP; 80 over IPv6) + 14.
    1500/1440 over IPv4: 0.958; 1500/1420 over IPv6: 0.958."""
    native = (underlay_mtu - (60 if ipv6 else 40)) / (underlay_mtu + 14)
    tunnel = (tunnel_mtu - 40) / (tunnel_mtu + (80 if ipv6 else 60) + 14)
    return tunnel / native


def run_with(binary: str, args: argparse.Namespace) -> dict[str, Any]:
    """A two-node lab whose agents run ``binary``: every path measured ``args.rounds`` times, interleaved."""
    lab = Lab(prefix=TAG[:3] + "m" + TAG[3:], state_dir=Path(tempfile.mkdtemp(prefix="warren-tp-")))
    rounds: dict[str, list[float]] = {"native": [], "manual_wg": [], "mesh": [], "pod": []}
    try:
        ipv6 = args.underlay == "ipv6"
        status = lab.up(2, backend="userspace", timeout=60, pods=1, wireguard_go=binary, underlay=args.underlay)
        mesh_target = status[1].overlay_ips[0]
        assert mesh_target is not None
        client, server = lab.node_netns(1), lab.node_netns(2)
        tunnel_mtu = int(sh(client, "cat", f"/sys/class/net/{lab.interface(1)}/mtu").stdout)
        underlay_mtu = int(sh(client, "cat", f"/sys/class/net/{lab.prefix}v1n/mtu").stdout)
        manual_target = setup_manual(lab, binary, tunnel_mtu, ipv6)
        if args.link_rate:
            for index in (1, 2):
                lab.set_underlay(index, rate=args.link_rate)
        pods = {pod.node: pod for pod in lab.pods()}
        for _ in range(args.rounds):
            rounds["native"].append(measure(server, client, lab.underlay_ips(2)[0], args.seconds))
            rounds["manual_wg"].append(measure(server, client, manual_target, args.seconds))
            rounds["mesh"].append(measure(server, client, mesh_target, args.seconds))
            rounds["pod"].append(measure(pods["node-2"].netns, pods["node-1"].netns, pods["node-2"].ip, args.seconds))
    finally:
        lab.down()  # removes the namespaces, and with them the hand-made tunnel's daemons
        for sock in SOCKET_DIR.glob(f"{TAG}*.sock"):
            sock.unlink(missing_ok=True)
    native, manual, mesh, pod = (statistics.median(rounds[k]) for k in ("native", "manual_wg", "mesh", "pod"))
    ceiling = ceiling_ratio(underlay_mtu, tunnel_mtu, ipv6)
    return {
        "native_gbps": round(native, 3),
        "manual_wg_gbps": round(manual, 3),
        "mesh_gbps": round(mesh, 3),
        "pod_gbps": round(pod, 3),
        "mesh_vs_manual": round(mesh / manual, 3),
        "tunnel_vs_native": round(mesh / native, 3),
        "pod_vs_tunnel": round(pod / mesh, 3),
        "link_rate": args.link_rate or "unlimited",
        "underlay": args.underlay,
        "ceiling_ratio": round(ceiling, 3),
        "tunnel_vs_ceiling": round(mesh / native / ceiling, 3),
        "wireguard_go_version": wireguard_go_version(binary),
        "wireguard_go": binary,
        "mtu": {"underlay": underlay_mtu, "tunnel": tunnel_mtu},
        "rounds": {k: [round(v, 3) for v in vs] for k, vs in rounds.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--link-rate", default=None, help="shape the underlay to this rate (tc's units: 1gbit, ...)")
    parser.add_argument("--underlay", choices=("ipv4", "ipv6"), default="ipv4", help="the nodes' underlay family")
    parser.add_argument(
        "--wireguard-go",
        action="append",
        metavar="PATH",
        help="the wireguard-go binary of the mesh and the hand-made tunnel (default: the one on PATH); give it again "
        "to measure other binaries in the same run (reported under 'others', and the first's mesh against each "
        "under 'mesh_vs')",
    )
    parser.add_argument(
        "--results",
        default=str(results.DEFAULT_DIR),
        help="directory for this run's results file (hack/bench_report.py makes docs' tables from them); '' for none",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("throughput.py creates network namespaces: run it as root")
    binaries = args.wireguard_go or [find_wireguard_go()]
    for binary in binaries:
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"--wireguard-go {binary}: not an executable file")
    runs = [run_with(binary, args) for binary in binaries]
    result = dict(runs[0])
    if len(runs) > 1:
        # The first binary's mesh against each other's, measured in this run on the same machine.
        result["mesh_vs"] = {
            run["wireguard_go_version"] or run["wireguard_go"]: round(runs[0]["mesh_gbps"] / run["mesh_gbps"], 3)
            for run in runs[1:]
        }
        result["others"] = runs[1:]
    result["seconds_per_run"] = args.seconds
    result["machine"] = results.machine()
    print(json.dumps(result))
    if args.results:
        print(f"throughput: results in {results.save('throughput', [result], Path(args.results))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
