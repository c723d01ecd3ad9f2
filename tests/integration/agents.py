"""In-process agents for tests: several real agents (memory devices) sharing one event loop and a real etcd."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import run
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.simulated import SimulatedAgents
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.records import NodeRecord


class Mesh(SimulatedAgents):
    """In-process agents sharing one event loop (testkit/simulated.py), with what tests ask of them."""

    def __init__(self, etcd: EtcdServer | str, prefix: str, key_dir: Path, ttl: int = 3) -> None:
        """``etcd``: a server of the tests' (each agent then gets its own node certificate and role where it has
        auth on), or plain endpoint URLs."""
        credentials = None
        if isinstance(etcd, EtcdServer) and etcd.pki is not None:
            server = etcd
            credentials = lambda name: server.authorize_node(name, prefix=prefix)  # noqa: E731
        endpoint = etcd.endpoint if isinstance(etcd, EtcdServer) else etcd
        super().__init__(endpoint, prefix, key_dir, ttl=ttl, interface="wgtest", credentials=credentials)

    def ended(self) -> dict[str, str]:
        """Agents whose run() ended on its own (an agent only ends when told to stop): name -> why."""
        return dict(self.died)

    def peer_names(self, name: str) -> set[str]:
        agent = self.agents[name]
        keys = set(self.device(name).peers)
        return {n for n, e in agent.view.nodes.items() if e.record.public_key in keys}

    def record(self, name: str) -> NodeRecord:
        """The record agent ``name`` registered last."""
        registrar = self.agents[name].registrar
        assert registrar is not None and registrar.current is not None, f"{name} has not registered"
        return registrar.current.record

    def metric(self, name: str, metric: str, labels: dict[str, str] | None = None) -> float:
        value = self.agents[name].metrics.registry.get_sample_value(metric, labels or {})
        return 0.0 if value is None else value

    async def converged(self, names: set[str] | None = None, timeout: float = 15.0) -> None:
        expect = set(self.agents) if names is None else names
        await wait_until(
            lambda: all(self.peer_names(n) == expect - {n} for n in expect if n in self.agents),
            timeout,
            f"full mesh of {sorted(expect)}",
            log=lambda: self.describe(expect),
        )

    def describe(self, names: set[str]) -> str:
        """Per agent: whom its view holds, whom its device has, whether it is healthy; what a timeout shows."""
        lines = []
        for name in sorted(names & set(self.agents)):
            agent = self.agents[name]
            lines.append(
                f"{name}: view {sorted(agent.view.nodes)}, device {sorted(self.peer_names(name))}, "
                f"healthy {agent.healthy()}, ended {self.died.get(name, 'no')}"
            )
        return "\n".join(lines)


def in_mesh(
    etcd: EtcdServer | str, prefix: str, key_dir: Path, scenario: Callable[[Mesh], object], ttl: int = 3
) -> None:
    async def main() -> None:
        mesh = Mesh(etcd, prefix, key_dir, ttl)
        try:
            await scenario(mesh)  # type: ignore[misc]
        finally:
            await mesh.close()

    run(main())
