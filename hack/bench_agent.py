"""Scenarios on one agent: its cold start next to N records, a metrics scrape."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from agent_pool import AgentPool
from bench_run import BenchError
from warren_mesh.agent.app import Agent, AgentParts
from warren_mesh.agent.parts import agent_store
from warren_mesh.host.node import NodeHost
from warren_mesh.identity.keys import NodeKey
from warren_mesh.lab import netns as lab_netns
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.metrics.peer_collector import PeerCollector, TrafficWindow
from warren_mesh.settings import AgentSettings
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import NodeRecord, encode_json
from warren_mesh.values.device import InterfaceSpec, PeerSpec
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.wireguard import uapi
from warren_mesh.wireguard.backend import Backend
from warren_mesh.wireguard.memory import MemoryBackend
from warren_mesh.wireguard.userspace import UserspaceBackend


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
                    await store.put(*claim(schema, i))
                    await store.put(*record(schema, i), lease=lease)
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
                await store.delete_prefix(schema.claims)
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
            await wait_until(
                lambda: agent.healthy() or run.done(), 120, "the wireguard-go agent to be ready", interval=0.002
            )
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
            backend.configure_interface(InterfaceSpec(("10.97.255.254/16",), 51820, 1420))
            started = time.perf_counter()
            backend.set_peers(specs)
            return time.perf_counter() - started
        finally:
            backend.close(remove_device=True)
    finally:
        lab_netns.remove(ns)


def _overlay_ip(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.96.{200 + i // 250}.{i % 250 + 1}")


def claim(schema: KeySchema, i: int) -> tuple[str, bytes]:
    """Node ``r<i>``'s claim on its overlay address: as a registered node has, so that the measured agent claims
    another one (without it, an agent could take a record's address and leave that record out)."""
    return schema.claim(f"r{i}", str(_overlay_ip(i))), b""


def record(schema: KeySchema, i: int, *, location: str | None = None, external: bool = False) -> tuple[str, bytes]:
    """Node ``r<i>``'s record (``location``, and with ``external`` an external endpoint: it may be a gateway)."""
    record = NodeRecord(
        name=f"r{i}",
        public_key=NodeKey.generate().public_key,
        endpoints=(Endpoint(ipaddress.ip_address("192.0.2.1"), 30000 + i % 30000),),
        overlay_ips=(_overlay_ip(i),),
        listen_port=51820,
        published_at=time.time(),
        location=location,
        external_endpoints=(Endpoint(ipaddress.ip_address("198.51.100.1"), 30000 + i % 30000),) if external else (),
    )
    return schema.node(record.name), encode_json(record.to_json())


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
                backend.configure_interface(InterfaceSpec(("10.97.255.254/16",), 51820, 1420))
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
