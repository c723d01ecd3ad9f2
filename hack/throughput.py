#!/usr/bin/env python3
"""Data-plane throughput in one run: native underlay, a hand-configured wireguard-go tunnel, and the lab's mesh.

    sudo .venv/bin/python hack/throughput.py [--seconds 5] [--rounds 3]

Prints one JSON line: native_gbps, manual_wg_gbps, mesh_gbps, mesh_vs_manual, tunnel_vs_native (plus the
per-round figures and the machine). All three cross the same path (two lab namespaces joined
by the lab's bridge): native over the underlay addresses, the hand-made tunnel on its own port and subnet, and the
mesh's tunnel. They are measured back to back with iperf3 (one TCP stream), each round interleaved so that machine
noise hits them alike; the median of the rounds is reported. The point of
mesh_vs_manual is that the control plane costs the data plane nothing: the mesh's tunnel is the same
wireguard-go, configured by the agent instead of by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from warren_mesh.keys import NodeKey
from warren_mesh.lab.lab import Lab
from warren_mesh.wireguard.uapi import SOCKET_DIR

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


def setup_manual(lab: Lab) -> str:
    """A second wireguard-go tunnel between the lab's node-1 and node-2, configured by hand (ip and wg, as a user
    would) on its own port and subnet: it crosses exactly the underlay the mesh crosses. Returns node-2's address."""
    keys = NodeKey.generate(), NodeKey.generate()
    env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
    with tempfile.TemporaryDirectory() as tmp:
        for i, index in enumerate((1, 2)):
            ns, iface, other = lab.node_netns(index), f"{TAG}w{i}", (2, 1)[i]
            subprocess.run(["ip", "netns", "exec", ns, "wireguard-go", iface], env=env, check=True, capture_output=True)
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
                f"{lab.underlay_ip(other)}:{MANUAL_PORT}",
                "allowed-ips",
                f"10.98.0.{other}/32",
            )
            sh(ns, "ip", "address", "add", f"10.98.0.{index}/24", "dev", iface)
            sh(ns, "ip", "link", "set", iface, "mtu", "1420", "up")
    return "10.98.0.2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("throughput.py creates network namespaces: run it as root")
    lab = Lab(prefix=TAG[:3] + "m" + TAG[3:], state_dir=Path(tempfile.mkdtemp(prefix="warren-tp-")))
    rounds: dict[str, list[float]] = {"native": [], "manual_wg": [], "mesh": []}
    try:
        status = lab.up(2, backend="userspace", timeout=60)
        mesh_target = status[1].overlay_ip
        assert mesh_target is not None
        manual_target = setup_manual(lab)
        client, server = lab.node_netns(1), lab.node_netns(2)
        for _ in range(args.rounds):
            rounds["native"].append(measure(server, client, lab.underlay_ip(2), args.seconds))
            rounds["manual_wg"].append(measure(server, client, manual_target, args.seconds))
            rounds["mesh"].append(measure(server, client, mesh_target, args.seconds))
    finally:
        lab.down()  # removes the namespaces, and with them the hand-made tunnel's daemons
        for sock in SOCKET_DIR.glob(f"{TAG}*.sock"):
            sock.unlink(missing_ok=True)
    native, manual, mesh = (statistics.median(rounds[k]) for k in ("native", "manual_wg", "mesh"))
    print(
        json.dumps(
            {
                "native_gbps": round(native, 3),
                "manual_wg_gbps": round(manual, 3),
                "mesh_gbps": round(mesh, 3),
                "mesh_vs_manual": round(mesh / manual, 3),
                "tunnel_vs_native": round(mesh / native, 3),
                "rounds": {k: [round(v, 3) for v in vs] for k, vs in rounds.items()},
                "seconds_per_run": args.seconds,
                "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
