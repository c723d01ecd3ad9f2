#!/usr/bin/env python3
"""Benchmarks of the control plane against a real etcd, each judged against a floor measured in the same run.

    .venv/bin/python hack/bench.py --scenario floor --scenario join --nodes 10

Scenarios (one JSON line each, latencies in milliseconds):
  floor  N watchers on the etcd3 client alone (no agent logic): put -> watch callback latency.
  join   N agents (real agent code, memory backend) settled; M more join one at a time; latency from the joining
         node's publish time to each other agent's device change for it.
  leave  graceful leaves (lease revoked): time to removal on every other agent (graceful_*_ms); one crash (an
         agent process SIGKILLed, its lease runs out): time until every agent removed it (detect_s, and
         detect_minus_ttl_s against the lease TTL).
  storm  N agents start at once: seconds until every agent has N-1 peers (converged_s).
  coldstart  one agent starting next to N existing records: seconds to a fully configured device (ready_s).
  churn  --churn random joins/graceful leaves on a settled mesh of N: afterwards every device must equal etcd
         (final_state_matches) and no agent may have touched a peer that did not change (untouched_changes).
  cost   one agent process, --records nodes joining one by one: CPU ms per applied event, RSS MB per 1000 peers.
  scrape one /metrics scrape of an agent whose device has --peers peers (memory device; also wireguard-go in a
         namespace of its own when root): wall and CPU milliseconds per scrape, exposition size.

The agents share this process and its event loop, so per-event figures include the other agents' work: on this
2-core machine the honest reading is "what every agent's device did", not an isolated single agent.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from prometheus_client import CollectorRegistry, generate_latest
from pyroute2 import netns

from warren_mesh.agent.app import Agent
from warren_mesh.device import InterfaceSpec, PeerSpec
from warren_mesh.keys import NodeKey
from warren_mesh.lab.etcd_server import EtcdServer, free_port
from warren_mesh.metrics.peer_collector import PeerCollector, TrafficWindow
from warren_mesh.model import Endpoint, NodeRecord, encode_json
from warren_mesh.schema import KeySchema
from warren_mesh.settings import AgentSettings
from warren_mesh.store.etcd import EtcdStore, parse_endpoints
from warren_mesh.wireguard.backend import Backend
from warren_mesh.wireguard.memory import MemoryBackend
from warren_mesh.wireguard.select import create_backend


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


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


def scenario_floor(endpoint: str, nodes: int, puts: int) -> dict[str, Any]:
    """The physical floor: one etcd commit plus watch fan-out to N clients, with nothing of ours in the way."""
    import etcd3

    target = parse_endpoints(endpoint)[0].target
    host, port = target.rsplit(":", 1)
    prefix = f"/bench-floor/{time.time_ns()}/"
    received: list[list[float]] = [[] for _ in range(puts)]
    lock = threading.Lock()
    clients = [etcd3.client(host=host, port=int(port), timeout=10) for _ in range(nodes)]

    def callback(response: Any) -> None:
        now = time.time()
        for event in getattr(response, "events", []):
            index = int(event.key.decode().rsplit("/", 1)[1])
            with lock:
                received[index].append(now)

    watch_ids = [client.add_watch_prefix_callback(prefix, callback) for client in clients]
    writer = etcd3.client(host=host, port=int(port), timeout=10)
    latencies: list[float] = []
    for i in range(puts):
        sent = time.time()
        writer.put(f"{prefix}{i}", b"x")
        deadline = time.monotonic() + 5
        while len(received[i]) < nodes and time.monotonic() < deadline:
            time.sleep(0.0005)
        latencies.extend((t - sent) * 1000 for t in received[i])
    # Cancel the watches but leave the clients open: etcd3's watcher thread re-dials a closed channel in a loop
    # and prints a traceback; its daemon threads end with this short-lived process.
    for client, watch_id in zip(clients, watch_ids, strict=True):
        client.cancel_watch(watch_id)
    writer.delete_prefix(prefix)
    writer.close()
    return {"scenario": "floor", "nodes": nodes, "puts": puts, **percentiles(latencies)}


async def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.002)


class SimulatedAgents:
    """Real agents (store, registrar, reconciler, metrics) on memory devices, sharing this process's loop."""

    def __init__(self, endpoint: str, scenario: str, key_dir: Path, ttl: int = 10) -> None:
        self.endpoint, self.key_dir, self.ttl = endpoint, key_dir, ttl
        self.prefix = f"/bench-{scenario}/{time.time_ns()}"
        self.agents: list[Agent] = []
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str) -> Agent:
        settings = AgentSettings.simulated(
            etcd_endpoint=self.endpoint,
            prefix=self.prefix,
            name=name,
            key_dir=self.key_dir,
            port=20000 + len(self._stops),
            interface="wgbench",
            lease_ttl=self.ttl,
        )
        agent = Agent(settings, backend=MemoryBackend(), registry=CollectorRegistry())
        self.agents.append(agent)
        self._stops[name] = asyncio.Event()
        self._tasks[name] = asyncio.create_task(agent.run(self._stops[name]))
        return agent

    @staticmethod
    def device(agent: Agent) -> MemoryBackend:
        backend = agent.backend
        assert isinstance(backend, MemoryBackend)
        return backend

    def peers(self, agent: Agent) -> int:
        return len(self.device(agent).peers)

    async def settle(self, timeout: float = 120) -> None:
        await _wait(lambda: all(self.peers(a) == len(self.agents) - 1 for a in self.agents), timeout, "the mesh")

    async def stop(self, agent: Agent) -> None:
        """A graceful leave: the agent revokes its lease on the way out."""
        name = agent.settings.node_name
        self._stops[name].set()
        await self._tasks.pop(name)
        self.agents.remove(agent)

    async def close(self) -> None:
        for agent in list(self.agents):
            await self.stop(agent)


def applied_at(agent: Agent, public_key: str, action: str) -> float:
    """When the agent's device last did ``action`` for ``public_key`` (wall clock)."""
    return max(
        op.at for op in SimulatedAgents.device(agent).operations if op.target == public_key and op.action == action
    )


async def scenario_join(endpoint: str, nodes: int, joins: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        mesh = SimulatedAgents(endpoint, "join", Path(tmp))
        try:
            for i in range(nodes):
                mesh.start(f"n{i}")
            await mesh.settle()
            latencies: list[float] = []
            for j in range(joins):
                before = list(mesh.agents)
                joiner = mesh.start(f"join{j}")
                await _wait(lambda before=before: all(mesh.peers(a) == len(before) for a in before), 30, f"join {j}")
                # The publish time as the observers received it: the joiner itself may not have processed its own
                # transaction's answer yet when the others have already applied its record.
                published = before[0].view.nodes[f"join{j}"].record.published_at
                key = joiner.key.public_key
                latencies.extend((applied_at(a, key, "set_peer") - published) * 1000 for a in before)
                others = len(before)
                await _wait(lambda joiner=joiner, n=others: mesh.peers(joiner) == n, 30, "the joiner's own mesh")
        finally:
            await mesh.close()
    return {"scenario": "join", "nodes": nodes, "joins": joins, **percentiles(latencies)}


async def scenario_leave(endpoint: str, nodes: int, leaves: int, ttl: int) -> dict[str, Any]:
    """Graceful leaves (lease revoked) and one crash (SIGKILL: the lease runs out), seen by every other agent."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        mesh = SimulatedAgents(endpoint, "leave", Path(tmp), ttl=ttl)
        try:
            for i in range(nodes + leaves):
                mesh.start(f"n{i}")
            await mesh.settle()
            graceful: list[float] = []
            for _ in range(leaves):
                leaver = mesh.agents[-1]
                key = leaver.key.public_key
                started = time.time()
                await mesh.stop(leaver)
                await _wait(lambda key=key: all(key not in mesh.device(a).peers for a in mesh.agents), 30, "removal")
                graceful.extend((applied_at(a, key, "remove_peer") - started) * 1000 for a in mesh.agents)
            crash_s = await _crash(mesh, Path(tmp), ttl)
        finally:
            await mesh.close()
    summary = percentiles(graceful)
    return {
        "scenario": "leave",
        "nodes": nodes,
        "ttl_s": ttl,
        "graceful_p50_ms": summary["p50_ms"],
        "graceful_p99_ms": summary["p99_ms"],
        "graceful_max_ms": summary["max_ms"],
        "detect_s": round(crash_s, 3),
        "detect_minus_ttl_s": round(crash_s - ttl, 3),
    }


async def _crash(mesh: SimulatedAgents, key_dir: Path, ttl: int) -> float:
    """Start a real agent process, SIGKILL it once everyone has it, and time until the last agent dropped it."""
    args = [
        sys.executable,
        "-m",
        "warren_mesh.cli",
        "agent",
        "--backend=memory",
        f"--etcd-endpoints={mesh.endpoint}",
        f"--prefix={mesh.prefix}",
        "--node-name=crasher",
        "--endpoint=127.0.0.1:29999",
        f"--key-file={key_dir / 'crasher.key'}",
        f"--lease-ttl={ttl}",
        "--metrics-address=",
    ]
    process = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _wait(lambda: all("crasher" in a.view.nodes for a in mesh.agents), 60, "the crasher to join")
        key = mesh.agents[0].view.nodes["crasher"].record.public_key
        await _wait(lambda: all(key in mesh.device(a).peers for a in mesh.agents), 30, "the crasher everywhere")
        killed = time.time()
        process.kill()
        await _wait(lambda: all(key not in mesh.device(a).peers for a in mesh.agents), ttl + 30, "crash detection")
        return max(applied_at(a, key, "remove_peer") for a in mesh.agents) - killed
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def scenario_coldstart(endpoint: str, records: int) -> dict[str, Any]:
    """One agent starting next to ``records`` existing node records: time to a fully configured device."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        mesh = SimulatedAgents(endpoint, "coldstart", Path(tmp))
        store = EtcdStore(endpoint)
        lease = await store.grant_lease(300)
        schema = KeySchema(mesh.prefix)
        for i in range(records):
            key, value = _record(schema, i)
            await store.put(key, value, lease=lease)
        try:
            started = time.monotonic()
            agent = mesh.start("cold")
            await _wait(lambda: mesh.peers(agent) == records, 120, "the cold agent's device")
            ready = time.monotonic() - started
        finally:
            await mesh.close()
            await store.revoke_lease(lease)
            await store.close()
    return {"scenario": "coldstart", "records": records, "ready_s": round(ready, 3)}


def _record(schema: KeySchema, i: int) -> tuple[str, bytes]:
    record = NodeRecord(
        name=f"r{i}",
        public_key=NodeKey.generate().public_key,
        endpoint=Endpoint(ipaddress.ip_address("127.0.0.1"), 30000 + i % 30000),
        overlay_ip=ipaddress.ip_address(f"10.96.{200 + i // 250}.{i % 250 + 1}"),
        listen_port=51820,
        published_at=time.time(),
    )
    return schema.node(record.name), encode_json(record.to_json())


async def scenario_storm(endpoint: str, nodes: int) -> dict[str, Any]:
    """N agents start at the same moment (a cluster cold boot): time until every agent has N-1 peers."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        mesh = SimulatedAgents(endpoint, "storm", Path(tmp))
        try:
            started = time.monotonic()
            for i in range(nodes):
                mesh.start(f"n{i}")
            await mesh.settle(timeout=600)
            converged = time.monotonic() - started
        finally:
            await mesh.close()
    return {"scenario": "storm", "nodes": nodes, "converged_s": round(converged, 3)}


async def scenario_churn(endpoint: str, nodes: int, operations: int, seed: int = 1) -> dict[str, Any]:
    """K random joins and graceful leaves on a settled mesh. Afterwards every agent's device must equal what etcd
    holds, and no agent may have touched a peer that did not itself join or leave (untouched_changes == 0)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        mesh = SimulatedAgents(endpoint, "churn", Path(tmp))
        store = EtcdStore(endpoint)
        try:
            for i in range(nodes):
                mesh.start(f"n{i}")
            await mesh.settle()
            marks = {a.settings.node_name: len(mesh.device(a).operations) for a in mesh.agents}
            churned: set[str] = set()  # public keys that joined or left
            started = time.monotonic()
            for k in range(operations):
                if rng.random() < 0.5 and len(mesh.agents) > 2:
                    leaver = rng.choice(mesh.agents)
                    churned.add(leaver.key.public_key)
                    await mesh.stop(leaver)
                else:
                    joiner = mesh.start(f"c{k}")
                    churned.add(joiner.key.public_key)
            await mesh.settle()
            converged = time.monotonic() - started
            registered = set()
            for kv in (await store.list_prefix(KeySchema(mesh.prefix).nodes)).items:
                registered.add(json.loads(kv.value)["public_key"])
            matches = all(set(mesh.device(a).peers) == registered - {a.key.public_key} for a in mesh.agents)
            untouched = 0
            for agent in mesh.agents:
                if agent.settings.node_name not in marks:
                    continue  # joined during the churn: configuring every peer is its first setup, not a change
                ops = list(mesh.device(agent).operations)[marks[agent.settings.node_name] :]
                untouched += sum(
                    1 for op in ops if op.action in ("set_peer", "remove_peer") and op.target not in churned
                )
        finally:
            await mesh.close()
            await store.close()
    return {
        "scenario": "churn",
        "nodes": nodes,
        "operations": operations,
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
        args += [f"--prefix={prefix}", "--node-name=measured", "--endpoint=127.0.0.1:29998", "--lease-ttl=30"]
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
    """(RSS bytes, user+system CPU seconds) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return rss, cpu


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
    """Like _wait, for conditions that block (HTTP): polled from a thread, every 50 ms."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
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
        netns.create(ns)
        netns.pushns(ns)  # this thread (and wireguard-go, forked from it) now live in the namespace
        try:
            backend = create_backend("userspace", "wbscrape0")
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
            netns.popns()
            netns.remove(ns)
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
        choices=("floor", "join", "leave", "storm", "coldstart", "churn", "cost", "scrape", "all"),
        default=[],
    )
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--joins", type=int, default=20, help="joins measured in the join scenario")
    parser.add_argument("--puts", type=int, default=50, help="puts measured in the floor scenario")
    parser.add_argument("--leaves", type=int, default=5, help="graceful leaves measured in the leave scenario")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL of the leave scenario's crash")
    parser.add_argument("--records", type=int, default=None, help="records for coldstart (default: --nodes)")
    parser.add_argument("--churn", type=int, default=20, help="random joins/leaves in the churn scenario")
    parser.add_argument("--peers", type=int, default=1000, help="device peers of the scrape scenario")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed in the scrape scenario")
    parser.add_argument("--etcd-endpoints", default=None, help="use this etcd instead of starting one")
    args = parser.parse_args()
    chosen = args.scenario or ["all"]
    if "all" in chosen:
        chosen = ["floor", "join", "leave", "storm", "coldstart", "churn", "cost", "scrape"]
    server = None
    if args.etcd_endpoints is None:
        server = EtcdServer()
        server.start()
        endpoint = server.endpoint
    else:
        endpoint = args.etcd_endpoints.split(",")[0]
    try:
        floor: dict[str, Any] | None = None
        for scenario in dict.fromkeys(chosen):
            if scenario == "floor":
                result = scenario_floor(endpoint, args.nodes, args.puts)
                floor = result
            elif scenario == "join":
                if floor is None:
                    floor = scenario_floor(endpoint, args.nodes, args.puts)
                result = asyncio.run(scenario_join(endpoint, args.nodes, args.joins))
                result["floor_p99_ms"] = floor["p99_ms"]
                result["p99_vs_floor"] = round(result["p99_ms"] / max(floor["p99_ms"], 1e-9), 2)
            elif scenario == "leave":
                result = asyncio.run(scenario_leave(endpoint, args.nodes, args.leaves, args.ttl))
            elif scenario == "storm":
                result = asyncio.run(scenario_storm(endpoint, args.nodes))
            elif scenario == "churn":
                result = asyncio.run(scenario_churn(endpoint, args.nodes, args.churn))
            elif scenario == "cost":
                result = asyncio.run(scenario_cost(endpoint, args.records or 1000))
            elif scenario == "scrape":
                result = scenario_scrape(args.peers, args.scrapes)
            else:
                result = asyncio.run(scenario_coldstart(endpoint, args.records or args.nodes))
            result["machine"] = machine()
            print(json.dumps(result), flush=True)
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
