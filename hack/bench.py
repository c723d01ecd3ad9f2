#!/usr/bin/env python3
"""Benchmarks of the control plane against a real etcd, each judged against a floor measured in the same run.

    .venv/bin/python hack/bench.py --scenario floor --scenario join --nodes 10
    .venv/bin/python hack/bench.py --scenario join --nodes 100 --etcd-auth   # TLS, client certificates, roles

Scenarios (one JSON line each, latencies in milliseconds):
  floor  N watchers on the etcd3 client alone (no agent logic): put -> watch callback latency.
  join   N agents (real agent code, memory backend) settled; M more join one at a time; latency from the joining
         node's publish time to each other agent's device change for it. As root also, in --pod-rounds fresh
         userspace labs, a third node joining two: its publish time until each other node's pod reaches a pod on
         it (pod_reachable_p50_ms, pod_reachable_p99_ms; pod_started_ms: until its pod was attached).
  leave  graceful leaves (lease revoked): time to removal on every other agent (graceful_*_ms); one crash (an
         agent process SIGKILLed, its lease runs out): time until every agent removed it (detect_s, and
         detect_minus_ttl_s against the lease TTL).
  storm  N agents start at once: seconds until every agent has N-1 peers (converged_s); also what it took:
         reconcile passes per agent, watch restarts (reason "behind": a watch resumed to catch up in batches) and
         re-registrations (each one a lease that was lost).
  coldstart  one agent starting next to N existing records: seconds to a fully configured device (ready_s; as
         root also userspace_ready_s: a real agent on wireguard-go, daemon start included, device in a namespace;
         of that, userspace_daemon_start_s, and userspace_set_peers_s: the first pass's one UAPI transaction alone,
         with the mesh's keepalive and without: wireguard-go starts a handshake with each peer inside the call).
  churn  --churn random joins/graceful leaves on a settled mesh of N: afterwards every device must equal etcd
         (final_state_matches) and no agent may have touched a peer that did not change (untouched_changes).
  cost   one agent process, --records nodes joining one by one: CPU ms per applied event, RSS MB per 1000 peers.
  scrape one /metrics scrape of an agent whose device has --peers peers (memory device; also wireguard-go in a
         namespace of its own when root): wall and CPU milliseconds per scrape, exposition size.
  rotate (root; not in "all") a userspace lab of N nodes, every pair exchanging --probe-rate datagrams a second;
         every node rotates its WireGuard key in turn (warren-mesh rotate-key): the worst pair's loss
         (worst_pair_loss, worst_pair_lost_ms) and longest gap (max_gap_ms), and the changes peers of nodes not
         rotating saw (untouched_changes, should be 0).

The agents are packed into --workers processes (default: one per core; hack/agent_pool.py), each running its
share on one event loop, so per-event figures include the other agents' work: on a 2-core machine the honest
reading is "what every agent's device did", not an isolated single agent. The floor's bare watchers are packed
the same way. The workers run at nice 5 so that etcd, which has CPUs of its own in a cluster, is not starved by
the simulated agents sharing its machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from prometheus_client import CollectorRegistry, generate_latest

import results
from agent_pool import AgentPool, BenchError, etcd3_client, wait_until
from warren_mesh.agent.app import Agent, AgentParts
from warren_mesh.agent.parts import agent_store
from warren_mesh.host.node import NodeHost
from warren_mesh.identity import pki
from warren_mesh.identity.keys import NodeKey, load_or_create
from warren_mesh.lab import netns as lab_netns
from warren_mesh.lab.lab import Lab
from warren_mesh.lab.probe import Probe
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.metrics.peer_collector import PeerCollector, TrafficWindow
from warren_mesh.settings import AgentSettings
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.etcd_server import EtcdServer, free_port
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.device import InterfaceSpec, PeerSpec
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.netaddr import parse_endpoints
from warren_mesh.wireguard import uapi
from warren_mesh.wireguard.backend import Backend
from warren_mesh.wireguard.memory import MemoryBackend
from warren_mesh.wireguard.userspace import UserspaceBackend


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "max_ms": round(ordered[-1], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "samples": len(ordered),
    }


# The run's PKI when etcd speaks TLS with auth on (--etcd-auth), else None.
PKI_DIR: Path | None = None


async def scenario_floor(endpoint: str, nodes: int, puts: int, workers: int) -> dict[str, Any]:
    """The physical floor: one etcd commit plus watch fan-out to N clients, with nothing of ours in the way. The
    watchers are packed into worker processes exactly as the agents are, so both pay the same for sharing."""
    host, port = parse_endpoints(endpoint)[0].target.rsplit(":", 1)
    writer = etcd3_client(host, int(port), PKI_DIR)
    prefix = f"/bench-floor/{time.time_ns()}/"
    try:
        with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
            async with AgentPool(endpoint, "floor", Path(tmp), workers=workers, pki_dir=PKI_DIR) as pool:
                latencies = await pool.floor(prefix, nodes, puts, lambda key: writer.put(key, b"x"))
    finally:
        writer.delete_prefix(prefix)
        writer.close()
    return {"scenario": "floor", "nodes": nodes, "puts": puts, "workers": workers, **percentiles(latencies)}


async def _start_all(pool: AgentPool, names: list[str]) -> None:
    """Start agents at once (the storm): each worker starts its share while the next requests are on their way."""
    for i in range(0, len(names), 50):
        await asyncio.gather(*(pool.start(name) for name in names[i : i + 50]))


async def _settled_mesh(pool: AgentPool, names: list[str], batch: int = 100) -> None:
    """Build the mesh a scenario starts from as a cluster grows, ``batch`` nodes at a time, each batch settled
    before the next (the storm scenario measures everyone starting at once)."""
    for i in range(0, len(names), batch):
        await _start_all(pool, names[i : i + batch])
        await pool.settle(timeout=900)


async def scenario_join(endpoint: str, nodes: int, joins: int, workers: int, lease_ttl: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "join", Path(tmp), workers=workers, ttl=lease_ttl, pki_dir=PKI_DIR) as pool:
            await _settled_mesh(pool, [f"n{i}" for i in range(nodes)])
            rebuilds = await pool.rebuilds()
            latencies: list[float] = []
            for j in range(joins):
                before = pool.names
                key = await pool.start(f"join{j}")
                applied = await pool.applied(key, present=True, names=before)
                # The publish time as the observers received it: the joiner itself may not have processed its own
                # transaction's answer yet when the others have already applied its record.
                published = await pool.published_at(f"join{j}", observer=before[0])
                latencies.extend((at - published) * 1000 for at in applied.values())
                await pool.settle()  # the joiner's own mesh, before the next one joins
            rebuilds = await pool.rebuilds() - rebuilds
    return {
        "scenario": "join",
        "nodes": nodes,
        "joins": joins,
        "workers": workers,
        "lease_ttl_s": lease_ttl,
        "etcd_auth": PKI_DIR is not None,
        "full_rebuilds": rebuilds,
        **percentiles(latencies),
    }


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
            probe = Probe({n.name: (n.netns, str(n.overlay_ip)) for n in status}, rate=rate, seconds=seconds)
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


async def scenario_leave(endpoint: str, nodes: int, leaves: int, ttl: int, workers: int) -> dict[str, Any]:
    """Graceful leaves (lease revoked) and one crash (SIGKILL: the lease runs out), seen by every other agent."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "leave", Path(tmp), workers=workers, ttl=ttl) as pool:
            await _settled_mesh(pool, [f"n{i}" for i in range(nodes + leaves)])
            graceful: list[float] = []
            for _ in range(leaves):
                leaver = pool.names[-1]
                key = pool.keys[leaver]
                started = time.time()
                await pool.stop(leaver)
                removed = await pool.applied(key, present=False)
                graceful.extend((at - started) * 1000 for at in removed.values())
            crash_s = await _crash(pool, Path(tmp), ttl)
    summary = percentiles(graceful)
    return {
        "scenario": "leave",
        "nodes": nodes,
        "ttl_s": ttl,
        "workers": workers,
        "graceful_p50_ms": summary["p50_ms"],
        "graceful_p99_ms": summary["p99_ms"],
        "graceful_max_ms": summary["max_ms"],
        "detect_s": round(crash_s, 3),
        "detect_minus_ttl_s": round(crash_s - ttl, 3),
    }


async def _crash(pool: AgentPool, key_dir: Path, ttl: int) -> float:
    """Start a real agent process, SIGKILL it once everyone has it, and time until the last agent dropped it."""
    key_file = key_dir / "crasher.key"
    key, _ = load_or_create(key_file)
    args = [
        sys.executable,
        "-m",
        "warren_mesh.cli",
        "agent",
        "--backend=memory",
        f"--etcd-endpoints={pool.endpoint}",
        f"--prefix={pool.prefix}",
        "--node-name=crasher",
        "--endpoint=192.0.2.1:29999",
        f"--key-file={key_file}",
        f"--lease-ttl={ttl}",
        "--metrics-address=",
    ]
    process = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await pool.applied(key.public_key, present=True, timeout=60)
        killed = time.time()
        process.kill()
        removed = await pool.applied(key.public_key, present=False, timeout=ttl + 30)
        return max(removed.values()) - killed
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def scenario_coldstart(endpoint: str, records: int) -> dict[str, Any]:
    """One agent starting next to ``records`` existing node records: time to a fully configured device, on the
    memory device and (when root) on wireguard-go."""
    result: dict[str, Any] = {"scenario": "coldstart", "records": records}
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "coldstart", Path(tmp), workers=1) as pool:
            store = EtcdStore(endpoint)
            lease = await store.grant_lease(300)
            schema = KeySchema(pool.prefix)
            try:
                for i in range(records):
                    key, value = _record(schema, i)
                    await store.put(key, value, lease=lease)
                started = time.monotonic()
                await pool.start("cold")
                await pool.settle(timeout=120, peers=records)
                result["ready_s"] = round(time.monotonic() - started, 3)
                if os.geteuid() == 0:
                    await pool.stop("cold")  # leaves exactly the records for the next agent
                    ready, daemon_start = await _coldstart_userspace(endpoint, pool.prefix, records, Path(tmp))
                    result["userspace_ready_s"] = round(ready, 3)
                    result["userspace_daemon_start_s"] = round(daemon_start, 3)
                    result["userspace_set_peers_s"] = {
                        f"keepalive_{keepalive}": round(await asyncio.to_thread(_set_peers_cost, records, keepalive), 3)
                        for keepalive in (25, 0)
                    }
            finally:
                await store.revoke_lease(lease)
                await store.close()
    return result


async def _coldstart_userspace(endpoint: str, prefix: str, records: int, key_dir: Path) -> tuple[float, float]:
    """The same cold start by a real agent on wireguard-go: seconds from starting it (daemon start included) to
    being ready, checked to mean a device holding every record's peer; and how many of them the daemon's start
    took (from its fork to its answering on the socket).

    The agent runs in this process, next to etcd; only its device lives in a network namespace of its own, so
    neither the TUN link nor the routes to the records' overlay addresses touch the host.
    """
    ns, interface = f"wbcold{os.getpid()}", f"wbc{os.getpid()}"
    try:
        await asyncio.to_thread(lab_netns.create, ns)  # pyroute2's sync calls cannot run on the event loop
        simulated = AgentSettings.simulated(
            etcd_endpoint=endpoint, prefix=prefix, name="cold-wg", key_dir=key_dir, port=51820, interface=interface
        )
        device = dataclasses.replace(simulated.device, backend="userspace", cleanup_on_exit=True)
        settings = dataclasses.replace(simulated, device=device)
        daemon_start: list[float] = []

        def start_daemon() -> UserspaceBackend:
            begun = time.monotonic()
            backend = UserspaceBackend(interface, netns=ns)
            daemon_start.append(time.monotonic() - begun)
            return backend

        metrics = AgentMetrics(CollectorRegistry())
        parts = AgentParts(agent_store(settings.store, metrics), NodeHost(), metrics, make_device=start_daemon)
        agent = Agent(settings, parts)
        stop = asyncio.Event()
        started = time.monotonic()
        run = asyncio.create_task(agent.run(stop))
        try:
            await wait_until(lambda: agent.healthy() or run.done(), 120, "the wireguard-go agent to be ready")
            ready = time.monotonic() - started
            if run.done():
                raise BenchError(f"the wireguard-go agent ended at start: {run.exception()!r}")
            peers = len((await agent.device_thread.run(agent.backend.read)).peers)
            if peers != records:
                raise BenchError(f"the wireguard-go agent was ready with {peers} peers, not {records}")
            return ready, daemon_start[0]
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(30):
                    await run
    finally:
        await asyncio.to_thread(lab_netns.remove, ns)  # also ends a wireguard-go the agent could not stop
        uapi.socket_path(interface).unlink(missing_ok=True)


def _set_peers_cost(peers: int, keepalive: int) -> float:
    """Seconds wireguard-go takes for the first pass's one UAPI transaction of ``peers`` peers. With a persistent
    keepalive it also starts a handshake with every peer inside that call, which is most of the cost: the split
    says how much of userspace_ready_s is the daemon's own work."""
    ns, interface = f"wbuapi{os.getpid()}", f"wbu{os.getpid()}"
    specs = [
        PeerSpec(
            NodeKey.generate().public_key, f"192.0.2.1:{30000 + i}", (f"10.97.{i // 250}.{i % 250 + 1}/32",), keepalive
        )
        for i in range(peers)
    ]
    lab_netns.create(ns)
    try:
        backend = UserspaceBackend(interface, netns=ns)
        try:
            backend.set_private_key(NodeKey.generate())
            backend.configure_interface(InterfaceSpec("10.97.255.254/16", 51820, 1420))
            started = time.perf_counter()
            backend.set_peers(specs)
            return time.perf_counter() - started
        finally:
            backend.close(remove_device=True)
    finally:
        lab_netns.remove(ns)


def _record(schema: KeySchema, i: int) -> tuple[str, bytes]:
    record = NodeRecord(
        name=f"r{i}",
        public_key=NodeKey.generate().public_key,
        endpoint=Endpoint(ipaddress.ip_address("192.0.2.1"), 30000 + i % 30000),
        overlay_ip=ipaddress.ip_address(f"10.96.{200 + i // 250}.{i % 250 + 1}"),
        listen_port=51820,
        published_at=time.time(),
    )
    return schema.node(record.name), encode_json(record.to_json())


async def scenario_storm(endpoint: str, nodes: int, workers: int, lease_ttl: int) -> dict[str, Any]:
    """N agents start at the same moment (a cluster cold boot): time until every agent has N-1 peers."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "storm", Path(tmp), workers=workers, ttl=lease_ttl) as pool:
            await pool.loop_lag()  # starts the workers' lag probes
            started = time.monotonic()
            await _start_all(pool, [f"n{i}" for i in range(nodes)])
            await pool.settle(timeout=900)
            converged = time.monotonic() - started
            rebuilds = await pool.rebuilds()
            lag = await pool.loop_lag()
            work = await pool.work()
    return {
        "scenario": "storm",
        "nodes": nodes,
        "workers": workers,
        "lease_ttl_s": lease_ttl,
        "converged_s": round(converged, 3),
        "full_rebuilds": rebuilds,
        "worst_loop_lag_s": round(lag, 3),
        "passes_per_agent": round(work["passes"] / nodes, 1),
        "watch_restarts": int(work["watch_restarts"]),
        "reregistrations": int(work["reregistrations"]),
    }


async def scenario_churn(
    endpoint: str, nodes: int, operations: int, workers: int, lease_ttl: int, *, seed: int = 1
) -> dict[str, Any]:
    """K random joins and graceful leaves on a settled mesh. Afterwards every agent's device must equal what etcd
    holds, and no agent may have touched a peer that did not itself join or leave (untouched_changes == 0)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "churn", Path(tmp), workers=workers, ttl=lease_ttl) as pool:
            store = EtcdStore(endpoint)
            try:
                await _settled_mesh(pool, [f"n{i}" for i in range(nodes)])
                await pool.mark()
                churned: set[str] = set()  # public keys that joined or left
                started = time.monotonic()
                for k in range(operations):
                    if rng.random() < 0.5 and len(pool.names) > 2:
                        leaver = rng.choice(pool.names)
                        churned.add(pool.keys[leaver])
                        await pool.stop(leaver)
                    else:
                        churned.add(await pool.start(f"c{k}"))
                await pool.settle()
                converged = time.monotonic() - started
                registered = {
                    json.loads(kv.value)["public_key"]
                    for kv in (await store.list_prefix(KeySchema(pool.prefix).nodes)).items
                }
                matches = await pool.devices_match(registered)
                untouched = await pool.untouched_changes(churned)
            finally:
                await store.close()
    return {
        "scenario": "churn",
        "nodes": nodes,
        "operations": operations,
        "workers": workers,
        "converged_s": round(converged, 3),
        "final_state_matches": matches,
        "untouched_changes": untouched,
    }


async def scenario_cost(endpoint: str, records: int) -> dict[str, Any]:
    """One real agent process (memory device): CPU per applied event and RSS growth, while ``records`` nodes join
    it one by one (each a separate etcd event and device change), read from /proc."""
    prefix = f"/bench-cost/{time.time_ns()}"
    schema = KeySchema(prefix)
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        port = free_port()
        args = [sys.executable, "-m", "warren_mesh.cli", "agent", "--backend=memory", f"--etcd-endpoints={endpoint}"]
        args += [f"--prefix={prefix}", "--node-name=measured", "--endpoint=192.0.2.1:29998", "--lease-ttl=30"]
        args += [f"--key-file={Path(tmp) / 'measured.key'}", f"--metrics-address=127.0.0.1:{port}"]
        process = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        store = EtcdStore(endpoint)
        lease = await store.grant_lease(300)
        try:
            await _wait_async(lambda: _peers_metric(port) is not None, 60, "the measured agent")
            await asyncio.sleep(1)  # let start-up settle (imports, first reconcile, allocations)
            rss0, cpu0 = _proc_usage(process.pid)
            for i in range(records):
                key, value = _record(schema, i)
                await store.put(key, value, lease=lease)
            await _wait_async(lambda: _peers_metric(port) == records, 300, "the measured agent's device")
            rss1, cpu1 = _proc_usage(process.pid)
        finally:
            process.terminate()
            await process.wait()
            await store.revoke_lease(lease)
            await store.delete_prefix(prefix)
            await store.close()
    return {
        "scenario": "cost",
        "records": records,
        "cpu_ms_per_event": round((cpu1 - cpu0) * 1000 / records, 3),
        "rss_mb_per_1000_peers": round((rss1 - rss0) / 1024 / 1024 * 1000 / records, 2),
        "rss_mb": round(rss1 / 1024 / 1024, 1),
    }


def _proc_usage(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process, from /proc. CPU is the sum of its threads' run time in nanoseconds
    (schedstat): the tick-based counters of /proc/PID/stat count in 10 ms steps, coarser than a small run."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    cpu_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            cpu_ns += int((task / "schedstat").read_text().split()[0])
    return rss, cpu_ns / 1e9


def _peers_metric(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("warren_mesh_peers "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


async def _wait_async(condition: Any, timeout: float, what: str) -> None:
    """Wait for a condition that blocks (HTTP): polled from a thread, every 50 ms."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def scenario_scrape(peers: int, scrapes: int) -> dict[str, Any]:
    """What one Prometheus scrape of an agent with ``peers`` peers costs: the per-peer collector reading the
    device and rendering the exposition. On the memory device always; on a real wireguard-go device (in a network
    namespace of its own) when running as root."""
    result: dict[str, Any] = {"scenario": "scrape", "peers": peers, "scrapes": scrapes}
    specs = [
        PeerSpec(
            NodeKey.generate().public_key, f"192.0.2.{i % 250 + 1}:{30000 + i}", (f"10.97.{i // 250}.{i % 250}/32",)
        )
        for i in range(peers)
    ]
    memory = MemoryBackend()
    for spec in specs:
        memory.set_peer(spec)
    result.update({f"memory_{k}": v for k, v in _time_scrapes(memory, specs, scrapes).items()})
    if os.geteuid() == 0:
        ns = f"wbscrape{os.getpid()}"
        try:
            lab_netns.create(ns)
            backend = UserspaceBackend("wbscrape0", netns=ns)  # wireguard-go started inside the namespace
            try:
                backend.set_private_key(NodeKey.generate())
                backend.configure_interface(InterfaceSpec("10.97.255.254/16", 51820, 1420))
                for spec in specs:
                    backend.set_peer(spec)
                timing = _time_scrapes(backend, specs, scrapes)
                result.update({f"userspace_{k}": v for k, v in timing.items()})
            finally:
                backend.close(remove_device=True)
        finally:
            lab_netns.remove(ns)
    return result


def _time_scrapes(backend: Backend, specs: list[PeerSpec], scrapes: int) -> dict[str, float]:
    registry = CollectorRegistry()
    names = {spec.public_key: f"node-{i}" for i, spec in enumerate(specs)}
    registry.register(PeerCollector(backend.read, lambda: names, TrafficWindow()))
    wall, cpu, size = [], [], 0
    for _ in range(scrapes):
        started, started_cpu = time.perf_counter(), time.process_time()
        size = len(generate_latest(registry))
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    return {
        "scrape_p50_ms": round(statistics.median(wall), 2),
        "scrape_max_ms": round(max(wall), 2),
        "scrape_cpu_ms": round(statistics.median(cpu), 2),
        "exposition_kb": round(size / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=("floor", "join", "leave", "storm", "coldstart", "churn", "cost", "scrape", "rotate", "all"),
        default=[],
    )
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--joins", type=int, default=20, help="joins measured in the join scenario")
    parser.add_argument("--puts", type=int, default=50, help="puts measured in the floor scenario")
    parser.add_argument("--leaves", type=int, default=5, help="graceful leaves measured in the leave scenario")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL of the leave scenario's crash")
    parser.add_argument("--records", type=int, default=None, help="records for coldstart (default: --nodes)")
    parser.add_argument("--churn", type=int, default=20, help="random joins/leaves in the churn scenario")
    parser.add_argument(
        "--probe-rate", type=float, default=200.0, help="datagrams a second per pair in the rotate scenario"
    )
    parser.add_argument("--peers", type=int, default=1000, help="device peers of the scrape scenario")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed in the scrape scenario")
    parser.add_argument(
        "--pod-rounds", type=int, default=5, help="join, as root: labs timed for pod reachability (0: none)"
    )
    parser.add_argument("--etcd-endpoints", default=None, help="use this etcd instead of starting one")
    parser.add_argument(
        "--etcd-auth",
        action="store_true",
        help="floor and join only: etcd with TLS, client certificates and per-node roles (as the lab runs it)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=int,
        default=10,
        help="lease TTL of the simulated agents in join, storm and churn (the product's default: 10 s)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes the simulated agents are spread over"
    )
    parser.add_argument(
        "--results",
        default=str(results.DEFAULT_DIR),
        help="directory for this run's results file (command, machine, every line; hack/bench_report.py makes "
        "docs/benchmarks.md's tables from them); '' for none",
    )
    args = parser.parse_args()
    chosen = args.scenario or ["all"]
    if "all" in chosen:
        chosen = ["floor", "join", "leave", "storm", "coldstart", "churn", "cost", "scrape"]
    server = None
    pki_tmp = None
    if args.etcd_auth:
        if args.etcd_endpoints is not None or set(chosen) - {"floor", "join"}:
            parser.error("--etcd-auth starts an etcd of its own, for the floor and join scenarios")
        global PKI_DIR  # noqa: PLW0603 (one setting for every scenario of this run)
        pki_tmp = tempfile.TemporaryDirectory(prefix="warren-bench-pki-")
        PKI_DIR = Path(pki_tmp.name)
        pki.init(PKI_DIR, ["127.0.0.1"])
    if args.etcd_endpoints is None:
        server = EtcdServer(pki=PKI_DIR)
        server.start()
        endpoint = server.endpoint
        if PKI_DIR is not None:
            # Root and the operator, auth on; each simulated node is given its role as it starts (AgentPool).
            server.enable_auth(prefix="/bench")
    else:
        endpoint = args.etcd_endpoints.split(",")[0]
    try:
        floor: dict[str, Any] | None = None
        for scenario in dict.fromkeys(chosen):
            if scenario in ("floor", "join") and floor is None:
                floor = asyncio.run(scenario_floor(endpoint, args.nodes, args.puts, args.workers))
                if scenario == "floor" or "floor" in chosen:
                    _emit(floor)
            if scenario == "floor":
                continue
            result = _run(scenario, endpoint, args)
            if scenario == "join" and floor is not None:
                if floor["p99_ms"] <= 0:  # a floor of nothing measured nothing: no ratio to report against it
                    raise BenchError(f"the floor's p99 is {floor['p99_ms']} ms: its watchers saw no events")
                result["floor_p99_ms"] = floor["p99_ms"]
                result["p99_vs_floor"] = round(result["p99_ms"] / floor["p99_ms"], 2)
            _emit(result)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()
        if pki_tmp is not None:
            pki_tmp.cleanup()
    if args.results:
        print(f"bench: results in {results.save('bench', EMITTED, Path(args.results))}", file=sys.stderr)
    return 0


def _run(scenario: str, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    workers = args.workers
    if scenario == "join":
        result = asyncio.run(scenario_join(endpoint, args.nodes, args.joins, workers, args.lease_ttl))
        if os.geteuid() == 0 and args.pod_rounds > 0:  # the lab drives netlink with an event loop of its own
            result.update(pod_reachability(args.pod_rounds))
        return result
    if scenario == "leave":
        return asyncio.run(scenario_leave(endpoint, args.nodes, args.leaves, args.ttl, workers))
    if scenario == "storm":
        return asyncio.run(scenario_storm(endpoint, args.nodes, workers, args.lease_ttl))
    if scenario == "churn":
        return asyncio.run(scenario_churn(endpoint, args.nodes, args.churn, workers, args.lease_ttl))
    if scenario == "cost":
        return asyncio.run(scenario_cost(endpoint, args.records or 1000))
    if scenario == "scrape":
        return scenario_scrape(args.peers, args.scrapes)
    if scenario == "rotate":
        if os.geteuid() != 0:
            raise BenchError("the rotate scenario runs a userspace lab: run it as root")
        return scenario_rotate(args.nodes, args.probe_rate)
    return asyncio.run(scenario_coldstart(endpoint, args.records or args.nodes))


EMITTED: list[dict[str, Any]] = []  # this run's lines, for its results file


def _emit(result: dict[str, Any]) -> None:
    result["machine"] = results.machine()
    EMITTED.append(result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
