"""In-process agents for tests: several real agents (memory devices) sharing one event loop and a real etcd."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from helpers import run, wait_until
from warren_mesh.agent.app import Agent
from warren_mesh.settings import AgentSettings
from warren_mesh.wireguard.memory import MemoryBackend


class Mesh:
    """In-process agents sharing one event loop; each has its own store, registry and memory device."""

    def __init__(self, endpoint: str, prefix: str, key_dir: Path, ttl: int = 3) -> None:
        self.endpoint, self.prefix, self.key_dir, self.ttl = endpoint, prefix, key_dir, ttl
        self.agents: dict[str, Agent] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(
        self,
        name: str,
        metrics_address: str | None = None,
        resync_interval: float = 30.0,
        etcd_endpoint: str | None = None,
    ) -> Agent:
        port = 20000 + len(self.agents)
        settings = AgentSettings.simulated(
            etcd_endpoint=etcd_endpoint or self.endpoint,
            prefix=self.prefix,
            name=name,
            key_dir=self.key_dir,
            port=port,
            interface="wgtest",
            lease_ttl=self.ttl,
            resync_interval=resync_interval,
            metrics_address=metrics_address,
        )
        agent = Agent(settings, backend=MemoryBackend(), registry=CollectorRegistry())
        self.agents[name] = agent
        self._stops[name] = asyncio.Event()
        self._tasks[name] = asyncio.create_task(agent.run(self._stops[name]))
        return agent

    def ended(self) -> dict[str, str]:
        """Agents whose run() ended on its own (an agent only ends when told to stop): name -> why."""
        return {
            name: repr(task.exception()) if not task.cancelled() else "cancelled"
            for name, task in self._tasks.items()
            if task.done()
        }

    async def stop(self, name: str) -> None:
        self._stops[name].set()
        await self._tasks.pop(name)
        del self.agents[name]

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)

    def device(self, name: str) -> MemoryBackend:
        backend = self.agents[name].backend
        assert isinstance(backend, MemoryBackend)
        return backend

    def peer_names(self, name: str) -> set[str]:
        agent = self.agents[name]
        keys = set(self.device(name).peers)
        return {n for n, e in agent.view.nodes.items() if e.record.public_key in keys}

    def metric(self, name: str, metric: str, labels: dict[str, str] | None = None) -> float:
        value = self.agents[name].metrics.registry.get_sample_value(metric, labels or {})
        return 0.0 if value is None else value

    async def converged(self, names: set[str] | None = None, timeout: float = 15.0) -> None:
        expect = set(self.agents) if names is None else names
        await wait_until(
            lambda: all(self.peer_names(n) == expect - {n} for n in expect if n in self.agents),
            timeout,
            f"full mesh of {sorted(expect)}",
        )


def in_mesh(endpoint: str, prefix: str, key_dir: Path, scenario: Callable[[Mesh], object], ttl: int = 3) -> None:
    async def main() -> None:
        mesh = Mesh(endpoint, prefix, key_dir, ttl)
        try:
            await scenario(mesh)  # type: ignore[misc]
        finally:
            await mesh.close()

    run(main())
