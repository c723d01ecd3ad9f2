"""The embedded default: a local etcd of our own and N agents on the memory backend, forming a mesh.

This runs the real agent (key files, address reservation, leases, watch, reconcile) in one process; only the
WireGuard device is simulated. It prints the mesh as etcd holds it and each agent's device, then shuts down
cleanly: leases revoked, etcd stopped, temporary files removed.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import TextIO

from warren_mesh.admin.status import read_status, render_table
from warren_mesh.agent.app import Agent
from warren_mesh.settings import AgentSettings
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.simulated import simulated_parts
from warren_mesh.values.keyspace import DEFAULT_PREFIX, KeySchema
from warren_mesh.wireguard.memory import MemoryBackend


async def run_demo(nodes: int, out: TextIO, timeout: float = 30.0) -> bool:
    with tempfile.TemporaryDirectory(prefix="warren-demo-") as tmp, EtcdServer() as etcd:
        out.write(f"etcd {etcd.endpoint} (data in {etcd.data_dir}); starting {nodes} agents (memory backend)\n")
        agents = [
            _agent(
                AgentSettings.simulated(
                    etcd_endpoint=etcd.endpoint,
                    prefix=DEFAULT_PREFIX,
                    name=f"node-{i}",
                    key_dir=Path(tmp),
                    port=51820 + i,
                    interface=f"wgdemo{i}",
                ),
            )
            for i in range(1, nodes + 1)
        ]
        stop = asyncio.Event()
        started = time.monotonic()
        tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
        try:
            formed = await _wait_for_mesh(agents, nodes - 1, timeout, tasks)
            elapsed = time.monotonic() - started
            if formed:
                out.write(f"full mesh of {nodes} nodes formed in {elapsed:.2f} s\n\n")
            else:
                out.write(f"the mesh did not form within {timeout:.0f} s\n")
            status = await read_status(agents[0].store, KeySchema())
            out.write(render_table(status) + "\n\n")
            for agent in agents:
                out.write(_describe_device(agent) + "\n")
            return formed
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


def _agent(settings: AgentSettings) -> Agent:
    return Agent(settings, simulated_parts(settings))


async def _wait_for_mesh(agents: list[Agent], peers: int, timeout: float, tasks: list[asyncio.Task[None]]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in tasks:
            if task.done():
                task.result()  # an agent failed: show why
        if all(len(agent.backend.read().peers) == peers and agent.healthy() for agent in agents):
            return True
        await asyncio.sleep(0.05)
    return False


def _describe_device(agent: Agent) -> str:
    backend = agent.backend
    device = backend.read()
    names = {entry.record.public_key: name for name, entry in agent.view.nodes.items()}
    iface = device.interface
    head = f"{agent.settings.node_name}: device {backend.interface_name}"
    if isinstance(backend, MemoryBackend) and iface is not None:
        head += f" address {', '.join(iface.addresses)} port {iface.listen_port} mtu {iface.mtu}"
    lines = [head]
    for key, peer in sorted(device.peers.items(), key=lambda kv: names.get(kv[0], kv[0])):
        lines.append(
            f"  peer {names.get(key, key[:10])}: endpoint {peer.endpoint}, allowed {', '.join(peer.allowed_ips)}, "
            f"keepalive {peer.persistent_keepalive}s"
        )
    return "\n".join(lines)
