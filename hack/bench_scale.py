"""Scenarios about size: one agent's cost per event beside 1,000 to 10,000 records, and a settled mesh that must
be quiet (etcd's own counters say what it was asked to write).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent_pool import AgentPool
from bench_agent import claim, record
from bench_mesh import settled_mesh
from bench_run import BenchError, proc_usage
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.etcd_server import free_port
from warren_mesh.testkit.exposition import scrape
from warren_mesh.testkit.waiting import wait_for
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Events

EVENT_GAP = 0.02  # seconds between two measured events: every one is a pass of its own at every size


def etcd_usage(endpoint: str) -> tuple[float, float] | None:
    """etcd's (CPU seconds so far, resident MB), from its own metrics; None where they cannot be read (TLS)."""
    metrics = scrape(f"{endpoint}/metrics")
    if "process_cpu_seconds_total" not in metrics:
        return None
    return metrics["process_cpu_seconds_total"], metrics.get("process_resident_memory_bytes", 0.0) / 2**20


class MeasuredAgent:
    """A real agent process (memory device, its metrics on a port of its own) whose CPU and memory are read
    from /proc, next to ``prefix``'s records."""

    def __init__(self, endpoint: str, prefix: str, key_dir: Path, *, resync: int, location: str | None = None) -> None:
        self.port = free_port()
        self._args = [sys.executable, "-m", "warren_mesh.cli", "agent", "--backend=memory"]
        self._args += [f"--etcd-endpoints={endpoint}", f"--prefix={prefix}", "--node-name=measured"]
        self._args += ["--endpoint=192.0.2.1:29998", "--lease-ttl=30", f"--resync-interval={resync}"]
        self._args += [f"--key-file={key_dir / 'measured.key'}", f"--metrics-address=127.0.0.1:{self.port}"]
        self._args += [] if location is None else [f"--location={location}"]
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> MeasuredAgent:
        self._process = await asyncio.create_subprocess_exec(
            *self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        await self._process.wait()

    def metrics(self) -> dict[str, float]:
        """A scrape: it costs the agent CPU (per-peer series), so never inside a measured window."""
        return scrape(f"http://127.0.0.1:{self.port}/metrics")

    async def wait_peers(self, peers: int, timeout: float = 300) -> None:
        def has() -> bool:
            return self.metrics().get("warren_mesh_peers") == peers

        await asyncio.to_thread(wait_for, has, timeout, f"the measured agent to have {peers} peers", interval=0.2)

    def usage(self) -> tuple[int, float]:
        assert self._process is not None
        return proc_usage(self._process.pid)

    async def quiet_cpu(self, settle: float = 0.5) -> float:
        """Its CPU seconds once it has stopped working (what it was given is done): no change over ``settle``."""
        _, cpu = self.usage()
        while True:
            await asyncio.sleep(settle)
            _, now = self.usage()
            if now - cpu < 0.002:
                return now
            cpu = now


async def _paced(actions: list[Any]) -> None:
    for action in actions:
        await action()
        await asyncio.sleep(EVENT_GAP)


async def _cost_at(
    endpoint: str, records: int, events: int, key_dir: Path, baseline_rss: int, *, locations: int
) -> dict[str, Any]:
    """One size: ``records`` records, then ``events`` joins and as many leaves, one at a time. With
    ``locations``, the records are spread over that many, the first of each its gateway (external endpoint and
    candidacy), and the measured agent is in the first: it routes every change (mesh/paths.py)."""
    prefix = f"/bench-cost/{time.time_ns()}"
    schema = KeySchema(prefix)
    store = EtcdStore(endpoint)
    lease = await store.grant_lease(600)
    result: dict[str, Any] = {"scenario": "cost", "records": records, "locations": locations, "events": events}

    def node(i: int) -> tuple[str, bytes]:
        if not locations:
            return record(schema, i)
        return record(schema, i, location=f"l{i % locations}", external=i < locations)

    try:
        for i in range(locations):  # the gateways stand first, so their candidacies are the oldest
            await store.put(schema.candidacy(f"r{i}", f"l{i}"), b"", lease=lease)
        # Written concurrently (setting up is not measured): every node's claim, the joiners' too (the measured
        # agent claims an address none of them has), then the records.
        for start in range(0, records + events, 200):
            batch = range(start, min(records + events, start + 200))
            await asyncio.gather(*(store.put(*claim(schema, i)) for i in batch))
        for start in range(0, records, 200):
            await asyncio.gather(*(store.put(*node(i), lease=lease) for i in range(start, min(records, start + 200))))
        location = "l0" if locations else None
        async with MeasuredAgent(endpoint, prefix, key_dir, resync=3600, location=location) as agent:
            started = time.monotonic()
            # Located, its peers are its own location's nodes (its gateway among them: it reaches the others so).
            peers = records if not locations else len(range(0, records, locations))
            await agent.wait_peers(peers)
            result["ready_s"] = round(time.monotonic() - started, 2)  # a process: imports included
            await asyncio.sleep(2)
            # What it spends doing nothing (lease, observers, reading its device): taken out of the events' CPU.
            idle_from, idle_cpu0 = time.monotonic(), await agent.quiet_cpu()
            await asyncio.sleep(5)
            idle_rate = (agent.usage()[1] - idle_cpu0) / (time.monotonic() - idle_from)
            rss, _ = agent.usage()
            joiners = [node(records + i) for i in range(events)]
            joined = events if not locations else len(range(records, records + events, locations))
            costs = {}
            for kind, actions, expected in (
                ("join", [lambda kv=kv: store.put(*kv, lease=lease) for kv in joiners], peers + joined),
                ("leave", [lambda kv=kv: store.delete(kv[0]) for kv in joiners], peers),
            ):
                begun, cpu0 = time.monotonic(), await agent.quiet_cpu()
                await _paced(actions)
                cpu1 = await agent.quiet_cpu()
                spent = cpu1 - cpu0 - idle_rate * (time.monotonic() - begun)
                costs[kind] = spent * 1000 / events
                await agent.wait_peers(expected, timeout=60)  # every event was applied (after the window: scrapes cost)
        # A full resync (the periodic comparison with the whole device), by a run that does one every second.
        async with MeasuredAgent(endpoint, prefix, key_dir, resync=1, location=location) as resyncing:
            await resyncing.wait_peers(peers)
            await asyncio.sleep(1)
            before = resyncing.metrics()
            await asyncio.sleep(5)
            after = resyncing.metrics()
        name = "warren_mesh_reconcile_duration_seconds"
        passes = after[f"{name}_count"] - before[f"{name}_count"]
        if passes < 1:
            raise BenchError("the resyncing agent made no pass in 5 s")
        result.update(
            {
                "cpu_ms_per_join": round(costs["join"], 3),
                "cpu_ms_per_leave": round(costs["leave"], 3),
                "cpu_ms_per_event": round((costs["join"] + costs["leave"]) / 2, 3),
                "idle_cpu_percent": round(idle_rate * 100, 2),
                "rss_mb": round(rss / 2**20, 1),
                "rss_mb_per_1000_peers": round((rss - baseline_rss) / 2**20 * 1000 / records, 2),
                "resync_ms": round((after[f"{name}_sum"] - before[f"{name}_sum"]) * 1000 / passes, 2),
            }
        )
    finally:
        await store.revoke_lease(lease)
        await store.delete_prefix(prefix)
        await store.close()
    return result


async def scenario_cost(endpoint: str, sizes: list[int], events: int, locations: int = 0) -> list[dict[str, Any]]:
    """One real agent process (memory device) beside each size of mesh: CPU per applied join and leave (each a
    pass of its own, its idle CPU taken out), RSS per 1,000 peers over an agent with none, one full resync."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with MeasuredAgent(endpoint, f"/bench-cost-empty/{time.time_ns()}", Path(tmp), resync=3600) as empty:
            await empty.wait_peers(0)
            await asyncio.sleep(2)
            baseline_rss, _ = empty.usage()
        lines = [await _cost_at(endpoint, size, events, Path(tmp), baseline_rss, locations=locations) for size in sizes]
    first = lines[0]["cpu_ms_per_event"]
    for line in lines:
        line["cpu_per_event_vs_smallest"] = round(line["cpu_ms_per_event"] / first, 2) if first > 0 else None
    return lines


async def scenario_idle(endpoint: str, nodes: int, workers: int, lease_ttl: int, seconds: float) -> dict[str, Any]:
    """A settled mesh of N simulated agents with nothing changing: what etcd is asked to do over ``seconds``.
    Writes (puts, deletes: the revision) must be 0; lease keepalives N / (TTL / 3) a second. Every key written
    in the window is also watched here, so a write names what it was."""
    with tempfile.TemporaryDirectory(prefix="warren-bench-") as tmp:
        async with AgentPool(endpoint, "idle", Path(tmp), workers=workers, ttl=lease_ttl) as pool:
            await settled_mesh(pool, [f"n{i}" for i in range(nodes)])
            await asyncio.sleep(lease_ttl + 25)  # past every start-up effect: first observations, reachability
            written: Counter[str] = Counter()
            store = EtcdStore(endpoint)
            try:
                watch = asyncio.create_task(_count_writes(store, pool.prefix, written))
                await asyncio.sleep(0.5)
                before, begun = scrape(f"{endpoint}/metrics"), time.monotonic()
                workers_before = pool.cpu_seconds()
                await asyncio.sleep(seconds)
                after, window = scrape(f"{endpoint}/metrics"), time.monotonic() - begun
                workers_cpu = pool.cpu_seconds() - workers_before
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            finally:
                await store.close()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {
        "scenario": "idle",
        "nodes": nodes,
        "workers": workers,
        "lease_ttl_s": lease_ttl,
        "window_s": round(window, 1),
        "revisions": int(delta("etcd_debugging_mvcc_current_revision")),
        "puts": int(delta("etcd_mvcc_put_total")),
        "deletes": int(delta("etcd_mvcc_delete_total")),
        "written": dict(written),
        "leases_granted": int(delta("etcd_debugging_lease_granted_total")),
        "keepalives_per_s": round(delta("etcd_debugging_lease_renewed_total") / window, 1),
        "keepalives_expected_per_s": round(nodes / (lease_ttl / 3), 1),
        "etcd_cpu_percent": round(delta("process_cpu_seconds_total") / window * 100, 1),
        # What one idle agent costs (its lease, timers, gRPC's own): every simulated agent's share of the workers.
        "agent_idle_cpu_ms_per_s": round(workers_cpu * 1000 / window / nodes, 3),
        "etcd_rss_mb": round(after.get("process_resident_memory_bytes", 0.0) / 2**20, 1),
    }


async def _count_writes(store: EtcdStore, prefix: str, written: Counter[str]) -> None:
    """Count every change under ``prefix`` by its kind (the key's first part under the prefix: nodes, claims...)."""
    async for result in store.observe(prefix + "/"):
        if isinstance(result, Events):
            for event in result.events:
                written[event.kv.key[len(prefix) + 1 :].split("/", 1)[0]] += 1
