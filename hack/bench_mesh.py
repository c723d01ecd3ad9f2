"""Scenarios on a mesh of simulated agents (hack/agent_pool.py) against a real etcd: floor, join, leave, storm,
churn, flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_pool import AgentPool, etcd3_client
from bench_agent import claim, record
from bench_run import percentiles
from warren_mesh.identity.keys import load_or_create
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.netaddr import parse_endpoints
from warren_mesh.values.watch import Snapshot


async def scenario_floor(
    endpoint: str, nodes: int, puts: int, workers: int, pki_dir: Path | None = None, *, client: str = "etcd3"
) -> dict[str, Any]:
    """The physical floor: one etcd commit plus watch fan-out to N clients, with nothing of ours in the way. The
    watchers are packed into worker processes exactly as the agents are, so both pay the same for sharing.
    ``client``: the etcd3 package's (a thread per watcher), or ``async``: our store's watch alone."""
    host, port = parse_endpoints(endpoint)[0].target.rsplit(":", 1)
    writer = etcd3_client(host, int(port), pki_dir)
    prefix = f"/bench-floor/{time.time_ns()}/"
    try:
        with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
            async with AgentPool(endpoint, "floor", Path(tmp), workers=workers, pki_dir=pki_dir) as pool:
                latencies = await pool.floor(prefix, nodes, puts, lambda key: writer.put(key, b"x"), client=client)
    finally:
        writer.delete_prefix(prefix)
        writer.close()
    line = {"scenario": "floor", "nodes": nodes, "puts": puts, "workers": workers, **percentiles(latencies)}
    return line if client == "etcd3" else {**line, "client": client}


async def _start_all(pool: AgentPool, names: list[str]) -> None:
    """Start agents at once (the storm): each worker starts its share while the next requests are on their way."""
    for i in range(0, len(names), 50):
        await asyncio.gather(*(pool.start(name) for name in names[i : i + 50]))


async def settled_mesh(pool: AgentPool, names: list[str], batch: int = 100) -> None:
    """Build the mesh a scenario starts from as a cluster grows, ``batch`` nodes at a time, each batch settled
    before the next (the storm scenario measures everyone starting at once)."""
    for i in range(0, len(names), batch):
        await _start_all(pool, names[i : i + batch])
        await pool.settle(timeout=900)


async def scenario_join(
    endpoint: str,
    nodes: int,
    joins: int,
    workers: int,
    lease_ttl: int,
    *,
    pki_dir: Path | None = None,
    locations: int = 0,
) -> dict[str, Any]:
    """``locations``: spread the nodes over that many locations (docs/topology.md), the first node of each with an
    external endpoint (its gateway); a joiner's latency is then until each agent routes it (to it, or to the
    gateway that carries it)."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "join", Path(tmp), workers=workers, ttl=lease_ttl, pki_dir=pki_dir) as pool:
            if locations:
                for i in range(nodes):
                    await pool.start(f"n{i}", location=f"l{i % locations}", external=i < locations)
                await pool.settle_routes()
            else:
                await settled_mesh(pool, [f"n{i}" for i in range(nodes)])
            rebuilds = await pool.rebuilds()
            latencies: list[float] = []
            for j in range(joins):
                before = pool.names
                if locations:
                    await pool.start(f"join{j}", location=f"l{j % locations}")
                    applied = await pool.routed(f"join{j}", names=before)
                else:
                    key = await pool.start(f"join{j}")
                    applied = await pool.applied(key, present=True, names=before)
                # The publish time as the observers received it: the joiner itself may not have processed its own
                # transaction's answer yet when the others have already applied its record.
                published = await pool.published_at(f"join{j}", observer=before[0])
                latencies.extend((at - published) * 1000 for at in applied.values())
                # The joiner's own mesh, before the next one joins.
                await (pool.settle_routes() if locations else pool.settle())
            rebuilds = await pool.rebuilds() - rebuilds
    return {
        "scenario": "join",
        "nodes": nodes,
        "locations": locations,
        "joins": joins,
        "workers": workers,
        "lease_ttl_s": lease_ttl,
        "etcd_auth": pki_dir is not None,
        "full_rebuilds": rebuilds,
        **percentiles(latencies),
    }


async def scenario_leave(endpoint: str, nodes: int, leaves: int, ttl: int, workers: int) -> dict[str, Any]:
    """Graceful leaves (lease revoked) and one crash (SIGKILL: the lease runs out), seen by every other agent."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "leave", Path(tmp), workers=workers, ttl=ttl) as pool:
            await settled_mesh(pool, [f"n{i}" for i in range(nodes + leaves)])
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


async def scenario_storm(endpoint: str, nodes: int, workers: int, lease_ttl: int) -> dict[str, Any]:
    """N agents start at the same moment (a cluster cold boot): time until every agent has N-1 peers."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "storm", Path(tmp), workers=workers, ttl=lease_ttl) as pool:
            await pool.loop_lag()  # starts the workers' lag probes
            cpu_before = pool.cpu_seconds()
            started = time.monotonic()
            await _start_all(pool, [f"n{i}" for i in range(nodes)])
            await pool.settle(timeout=900)
            converged = time.monotonic() - started
            cpu = pool.cpu_seconds() - cpu_before
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
        # The machine's share: every simulated agent's CPU, and per record each agent took in (N of them, N times).
        "agents_cpu_s": round(cpu, 1),
        "agents_cpu_us_per_record": round(cpu * 1e6 / (nodes * nodes), 1),
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
                await settled_mesh(pool, [f"n{i}" for i in range(nodes)])
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


async def scenario_flood(endpoint: str, nodes: int, workers: int, seconds: float) -> dict[str, Any]:
    """One node's record rewritten as fast as etcd takes it (a new endpoint each time: a stolen credential, or a
    bug) for ``seconds``, beside N simulated agents; halfway through, a node joins. What the flood costs each agent
    (CPU per write it took in: the damper holds the flooder's updates back, mesh/damping.py), and how late the
    join reaches them, against a bare watcher of the same prefix in this process (etcd's delivery under the
    flood: the floor)."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "flood", Path(tmp), workers=workers) as pool:
            await settled_mesh(pool, [f"n{i}" for i in range(nodes)])
            schema = KeySchema(pool.prefix)
            store, watcher = EtcdStore(endpoint), EtcdStore(endpoint)
            try:
                await store.put(*claim(schema, 0))
                key, value = record(schema, 0)
                flooded = json.loads(value)
                await store.put(key, value)
                await pool.settle(peers=nodes)
                arrived: dict[str, float] = {}
                watching = asyncio.ensure_future(_arrivals(watcher, schema, arrived))
                writes = 0
                stop = asyncio.Event()

                async def flood() -> None:
                    nonlocal writes
                    while not stop.is_set():
                        flooded["endpoint"] = f"192.0.2.1:{1000 + writes % 60000}"
                        await store.put(key, json.dumps(flooded).encode())
                        writes += 1

                cpu_before = pool.cpu_seconds()
                started = time.monotonic()
                flooding = asyncio.ensure_future(flood())
                await asyncio.sleep(seconds / 2)
                before = pool.names
                joiner = await pool.start("joiner")
                applied = await pool.applied(joiner, present=True, names=before)
                published = await pool.published_at("joiner", observer=before[0])
                await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
                stop.set()
                await flooding
                window = time.monotonic() - started
                cpu = pool.cpu_seconds() - cpu_before
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            finally:
                await store.close()
                await watcher.close()
    lags = sorted((at - published) * 1000 for at in applied.values())
    return {
        "scenario": "flood",
        "nodes": nodes,
        "workers": workers,
        "seconds": seconds,
        "writes_per_s": round(writes / window, 1),
        "agent_cpu_us_per_write": round(cpu * 1e6 / max(1, writes) / nodes, 1),
        "agents_cpu_share": round(cpu / window, 2),
        "join_p50_ms": round(lags[len(lags) // 2], 1),
        "join_max_ms": round(lags[-1], 1),
        "floor_ms": round((arrived["joiner"] - published) * 1000, 1),
    }


async def _arrivals(store: EtcdStore, schema: KeySchema, arrived: dict[str, float]) -> None:
    """When each node's first record reached a bare watcher of the mesh's prefix (wall clock)."""
    async for result in store.observe(schema.root):
        kvs = result.items if isinstance(result, Snapshot) else [event.kv for event in result.events]
        for kv in kvs:
            kind = schema.classify(kv.key)
            if kind is not None and kind[0] == "node" and kind[1] not in arrived:
                arrived[kind[1]] = time.time()
