"""Simulated agents: real agents on memory devices, many to one event loop, each with its own store connection,
metrics registry and device. What the demo, the tests and the benchmarks' worker processes run.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from warren_mesh.agent.app import Agent, AgentParts
from warren_mesh.agent.parts import agent_store
from warren_mesh.host.simulated import SimulatedHost
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import AgentSettings
from warren_mesh.wireguard.backend import Backend
from warren_mesh.wireguard.memory import MemoryBackend


def simulated_parts(
    settings: AgentSettings, *, device: Backend | None = None, registry: CollectorRegistry | None = None
) -> AgentParts:
    """A simulated node's parts: a store of its own, the simulated host, ``device`` (else a memory device)."""
    metrics = AgentMetrics(registry if registry is not None else CollectorRegistry())
    return AgentParts(
        agent_store(settings.store, metrics),
        SimulatedHost(),
        metrics,
        device=device if device is not None else MemoryBackend(interface_name=settings.device.interface),
    )


class SimulatedAgents:
    """Agents started and stopped one by one; ``died`` says which ended without being told to, and why."""

    def __init__(
        self,
        endpoint: str,
        prefix: str,
        key_dir: Path,
        *,
        ttl: int | None,
        interface: str,
        credentials: Callable[[str], EtcdTls | None] | None = None,
    ) -> None:
        """``credentials``: each agent's etcd credentials by name, when start() is not given them."""
        self.endpoint, self.prefix, self.key_dir, self.ttl, self.interface = endpoint, prefix, key_dir, ttl, interface
        self._credentials = credentials
        self.agents: dict[str, Agent] = {}
        self.died: dict[str, str] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ports = 20000

    def start(
        self,
        name: str,
        *,
        port: int | None = None,
        metrics_address: str | None = None,
        resync_interval: float = 30.0,
        etcd_endpoint: str | None = None,
        tls: EtcdTls | None = None,
        location: str | None = None,
        external: bool = False,
    ) -> Agent:
        """Start agent ``name`` (``etcd_endpoint``: other URLs than the pool's, comma-separated; ``location``,
        ``external``: where it is, and whether it may be its location's gateway)."""
        if port is None:
            self._ports += 1
            port = self._ports
        if tls is None and self._credentials is not None:
            tls = self._credentials(name)
        settings = AgentSettings.simulated(
            etcd_endpoint=etcd_endpoint or self.endpoint,
            prefix=self.prefix,
            name=name,
            key_dir=self.key_dir,
            port=port,
            interface=self.interface,
            lease_ttl=self.ttl,
            resync_interval=resync_interval,
            metrics_address=metrics_address,
            tls=tls,
            location=location,
            external=external,
        )
        agent = Agent(settings, simulated_parts(settings))
        self.agents[name] = agent
        self._stops[name] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(agent.run(self._stops[name]), name=f"agent-{name}")
        task.add_done_callback(lambda done: self._ended(name, done))
        self._tasks[name] = task
        return agent

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        """An agent's run() only returns when told to stop: anything else is an agent bug, kept to be reported."""
        stop = self._stops.get(name)
        if stop is not None and stop.is_set():
            return
        error = None if task.cancelled() else task.exception()
        self.died[name] = "cancelled" if task.cancelled() else f"{type(error).__name__}: {error}"
        if error is not None:
            self.died[name] += "\n" + "".join(traceback.format_exception(error))

    async def stop(self, name: str) -> None:
        """A graceful leave: the agent revokes its lease on the way out."""
        self._stops[name].set()
        await self._tasks.pop(name)
        del self.agents[name]
        del self._stops[name]

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)

    def device(self, name: str) -> MemoryBackend:
        backend = self.agents[name].backend
        assert isinstance(backend, MemoryBackend)
        return backend
