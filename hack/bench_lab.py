"""Scenarios on a userspace lab (root): pods reachable after a join, and hitless key rotation."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_run import BenchError, percentiles
from warren_mesh.lab.lab import Lab
from warren_mesh.lab.probe import Probe


def pod_reachability(rounds: int) -> dict[str, float]:
    """In the userspace lab (root): a third node joins a 2-node lab with a pod per node; from the joining agent's
    record being published (its ``published_at``) until the pod on each other node gets an answer from a pod on the
    new node. ``rounds`` fresh labs; the new node's pod is started as soon as its agent wrote its CNI config."""
    samples: list[float] = []
    started: list[float] = []
    with tempfile.TemporaryDirectory(prefix="warren-bench-lab-") as tmp:
        lab = Lab(prefix="wmbench", state_dir=Path(tmp) / "lab")
        try:
            for _ in range(rounds):
                lab.down()
                lab.up(2, backend="userspace", lease_ttl=3, timeout=120, pods=1)
                lab.add_node(3)
                lab.wait_for_agent(3, timeout=60)
                pod = lab.add_pod("node-3", "pod-1")
                published = _published_at(lab, "node-3")
                started.append((time.time() - published) * 1000)
                waiting = {p for p in lab.pods() if p.node != "node-3"}
                while waiting:
                    for source in list(waiting):
                        argv = lab.pod_exec_argv(source.node, source.name, ["ping", "-c", "1", "-W", "0.2", pod.ip])
                        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
                            samples.append((time.time() - published) * 1000)
                            waiting.discard(source)
                    if waiting and time.time() - published > 60:
                        raise BenchError(f"pods {waiting} never reached {pod}")
        finally:
            lab.down()
    return {
        "pod_reachable_p50_ms": round(statistics.median(samples), 1),
        "pod_reachable_p99_ms": round(percentiles(samples)["p99_ms"], 1),
        "pod_started_ms": round(statistics.median(started), 1),
        "pod_samples": len(samples),
    }


def scenario_rotate(nodes: int, rate: float) -> dict[str, Any]:
    """Every node of a userspace lab rotates its key, one after another, while every pair exchanges ``rate``
    datagrams a second (lab/probe.py). Reports the worst pair's loss and longest gap, and how many peers of nodes
    not rotating changed (endpoint, allowed IPs, keepalive) during each rotation: there should be none."""
    per_rotation = 6.0  # seconds allowed for each (announce, 2 s grace, switch, publish, peers moved)
    seconds = 2.0 + nodes * per_rotation
    with tempfile.TemporaryDirectory(prefix="warren-bench-rotate-") as tmp:
        lab = Lab(prefix=f"wbr{os.getpid() % 10000}", state_dir=Path(tmp) / "lab")
        try:
            lab.up(nodes, backend="userspace", lease_ttl=10, timeout=60 + 10 * nodes)
            status = lab.status()
            probe = Probe({n.name: (n.netns, n.overlay_ips[0]) for n in status}, rate=rate, seconds=seconds)
            probe.start()
            try:
                time.sleep(2.0)  # the probes' start (they listen a second before sending), then a second of traffic
                untouched_changes, durations = 0, []
                for index in range(1, nodes + 1):
                    before = {i: lab.peer_config(i) for i in range(1, nodes + 1) if i != index}
                    old = lab.public_key(index)
                    started = time.monotonic()
                    lab.rotate_key(lab.node_name(index))
                    deadline = started + per_rotation * 3

                    def moved(index: int = index, old: str = old) -> bool:
                        new = lab.public_key(index)
                        if new in ("", old):
                            return False
                        configs = [lab.peer_config(i) for i in range(1, nodes + 1) if i != index]
                        return all(new in c and old not in c for c in configs)

                    while not moved():
                        if time.monotonic() > deadline:
                            raise BenchError(f"node-{index}'s rotation did not reach every peer in time")
                        time.sleep(0.05)
                    durations.append(time.monotonic() - started)
                    new = lab.public_key(index)
                    for i, config in before.items():
                        after = lab.peer_config(i)
                        for key in set(config) | set(after):
                            if key not in (old, new) and config.get(key) != after.get(key):
                                untouched_changes += 1
                    time.sleep(max(0.0, per_rotation - (time.monotonic() - started)))
                pairs = probe.results()
            finally:
                probe.stop()
        finally:
            lab.down()
    worst = max(pairs.items(), key=lambda item: item[1][0])
    longest = max(pairs.items(), key=lambda item: item[1][1])
    return {
        "scenario": "rotate",
        "nodes": nodes,
        "rate": rate,
        "rotations": len(durations),
        "max_gap_ms": longest[1][1],
        "max_gap_pair": "->".join(longest[0]),
        "worst_pair_loss": worst[1][0],
        "worst_pair_lost_ms": round(worst[1][0] * seconds * 1000, 1),
        "worst_loss_pair": "->".join(worst[0]),
        "pairs": len(pairs),
        "untouched_changes": untouched_changes,
        "rotation_s_p50": round(statistics.median(durations), 2),
        "rotation_s_max": round(max(durations), 2),
        "probe_seconds": seconds,
    }


def _published_at(lab: Lab, node: str) -> float:
    """The node record's own publish time, read from the lab's etcd inside its hub namespace."""
    argv = [
        "ip",
        "netns",
        "exec",
        lab.hub,
        *lab.access().etcdctl("get", f"/warren/mesh/v1/nodes/{node}", "--print-value-only"),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ, "ETCDCTL_API": "3"})
    return float(json.loads(out.stdout)["published_at"])


def scenario_failover(rounds: int, ttl: int) -> dict[str, Any]:
    """docs/topology.md: a userspace lab of two locations (a: 3 nodes with a WAN link and one without; b: one of
    each); a 50/s UDP probe between the two nodes without a WAN link crosses both gateways. ``rounds`` times the
    gateway of a has its WAN link cut (its node and agent healthy: kilo#489) and back; then its node dies. Reports
    the probe's longest gap for each, against the floor of the same run: the lease TTL (nothing notices a dead node
    sooner) and the give-up bound (TTL + GIVE_UP_MARGIN: a gateway waits that long for any answer)."""
    from warren_mesh.agent.gateway import GIVE_UP_MARGIN, HOLD_DOWN_FACTOR

    cuts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="warren-bench-failover-") as tmp:
        lab = Lab(prefix=f"wbf{os.getpid() % 10000}", state_dir=Path(tmp) / "lab")
        try:
            lab.up(6, backend="userspace", lease_ttl=ttl, timeout=120, locations="a:4:3,b:2")

            def gateway_of_a() -> int:
                key = _carrier_key(lab, 4, 6)
                return next(i for i in (1, 2, 3) if lab.public_key(i) == key)

            def longest_gap(action: Any) -> float:
                status = {s.name: s for s in lab.status()}
                ends = {n: (status[n].netns, status[n].overlay_ips[0]) for n in ("node-4", "node-6")}
                probe = Probe(ends, rate=50, seconds=ttl + GIVE_UP_MARGIN + 15)
                probe.start()
                try:
                    time.sleep(3)
                    action()
                    results = probe.results()
                finally:
                    probe.stop()
                return max(gap for _, gap in results.values())

            for _ in range(rounds):
                gateway = gateway_of_a()
                cuts.append(longest_gap(lambda gateway=gateway: lab.set_wan(gateway, up=False)))
                lab.set_wan(gateway, up=True)
                time.sleep(HOLD_DOWN_FACTOR * (ttl + GIVE_UP_MARGIN) + 2)  # it stands again, behind the others
            gateway = gateway_of_a()

            def die() -> None:
                lab.kill_agent(gateway)
                lab.isolate(gateway)

            death = longest_gap(die)
        finally:
            lab.down()
    return {
        "scenario": "failover",
        "rounds": rounds,
        "lease_ttl_ms": ttl * 1000,
        "give_up_bound_ms": (ttl + GIVE_UP_MARGIN) * 1000,
        "wan_cut_gap_ms_p50": round(statistics.median(cuts), 1),
        "wan_cut_gap_ms_max": round(max(cuts), 1),
        "node_death_gap_ms": round(death, 1),
    }


def _carrier_key(lab: Lab, index: int, target: int) -> str:
    """The public key of the peer node ``index``'s device sends node ``target``'s overlay address to."""
    address = f"{lab.status()[target - 1].overlay_ips[0]}/32"
    for key, (_, allowed, _) in lab.peer_config(index).items():
        if address in allowed.split(","):
            return key
    raise BenchError(f"node-{index} has no path to node-{target}")
