#!/usr/bin/env python3
"""Benchmarks of the control plane against a real etcd, each judged against a floor measured in the same run.

    .venv/bin/python hack/bench.py --scenario floor --scenario join --nodes 10

Scenarios (one JSON line each, latencies in milliseconds):
  floor  N watchers on the etcd3 client alone (no agent logic): put -> watch callback latency.
  join   N agents (real agent code, memory backend) settled; M more join one at a time; latency from the joining
         node's publish time to each other agent's device change for it.

The agents share this process and its event loop, so per-event figures include the other agents' work: on this
2-core machine the honest reading is "what every agent's device did", not an isolated single agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from prometheus_client import CollectorRegistry

from warren_mesh.agent.app import Agent
from warren_mesh.lab.etcd_server import EtcdServer
from warren_mesh.schema import KeySchema
from warren_mesh.settings import AgentSettings, StoreSettings
from warren_mesh.store.etcd import parse_endpoints
from warren_mesh.wireguard.memory import MemoryBackend


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


def bench_settings(endpoint: str, prefix: str, name: str, key_dir: Path, port: int) -> AgentSettings:
    return AgentSettings(
        store=StoreSettings((endpoint,), KeySchema(prefix)),
        node_name=name,
        endpoint_host="127.0.0.1",
        endpoint_port=port,
        interface="wgbench",
        backend="memory",
        key_file=key_dir / f"{name}.key",
        lease_ttl=10,
        metrics_address=None,
    )


async def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def scenario_join(endpoint: str, nodes: int, joins: int) -> dict[str, Any]:
    prefix = f"/bench-join/{time.time_ns()}"
    stop = asyncio.Event()
    agents: list[Agent] = []
    tasks: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:

        def start(name: str) -> Agent:
            agent = Agent(
                bench_settings(endpoint, prefix, name, Path(tmp), 20000 + len(agents)),
                backend=MemoryBackend(),
                registry=CollectorRegistry(),
            )
            agents.append(agent)
            tasks.append(asyncio.create_task(agent.run(stop)))
            return agent

        def peers(agent: Agent) -> int:
            backend = agent.backend
            assert isinstance(backend, MemoryBackend)
            return len(backend.peers)

        for i in range(nodes):
            start(f"n{i}")
        await _wait(lambda: all(peers(a) == nodes - 1 for a in agents), 120, "the initial mesh")
        latencies: list[float] = []
        for j in range(joins):
            before = list(agents)
            joiner = start(f"join{j}")
            await _wait(lambda before=before: all(peers(a) == len(agents) - 1 for a in before), 30, f"join {j}")
            # The publish time as the observers received it: the joiner itself may not have processed its own
            # transaction's answer yet when the others have already applied its record.
            published = before[0].view.nodes[f"join{j}"].record.published_at
            for agent in before:
                backend = agent.backend
                assert isinstance(backend, MemoryBackend)
                applied = next(op.at for op in backend.operations if op.target == joiner.key.public_key)
                latencies.append((applied - published) * 1000)
            await _wait(lambda joiner=joiner: peers(joiner) == len(agents) - 1, 30, "the joiner's own mesh")
        stop.set()
        await asyncio.gather(*tasks)
    return {"scenario": "join", "nodes": nodes, "joins": joins, **percentiles(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=("floor", "join", "all"), default=[])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--joins", type=int, default=20, help="joins measured in the join scenario")
    parser.add_argument("--puts", type=int, default=50, help="puts measured in the floor scenario")
    parser.add_argument("--etcd-endpoints", default=None, help="use this etcd instead of starting one")
    args = parser.parse_args()
    chosen = args.scenario or ["all"]
    if "all" in chosen:
        chosen = ["floor", "join"]
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
            else:
                if floor is None:
                    floor = scenario_floor(endpoint, args.nodes, args.puts)
                result = asyncio.run(scenario_join(endpoint, args.nodes, args.joins))
                result["floor_p99_ms"] = floor["p99_ms"]
                result["p99_vs_floor"] = round(result["p99_ms"] / max(floor["p99_ms"], 1e-9), 2)
            result["machine"] = machine()
            print(json.dumps(result), flush=True)
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
