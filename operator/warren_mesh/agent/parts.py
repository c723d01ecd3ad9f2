"""The parts an agent runs on, made for this machine from its settings: etcd, this host, the settings' backend.

The memory backend (``--backend memory``) is a simulated node: its device sees no packets and its address is on
no interface here, so it gets the simulated host (host/simulated.py) and is driven inline.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from warren_mesh.agent.app import AgentParts
from warren_mesh.host.node import NodeHost
from warren_mesh.host.simulated import SimulatedHost
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import AgentSettings, StoreSettings
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.wireguard.choice import create_backend
from warren_mesh.wireguard.memory import MemoryBackend


def agent_store(settings: StoreSettings, metrics: AgentMetrics) -> EtcdStore:
    """The agent's etcd client, reporting its health to ``metrics``."""
    return EtcdStore(settings.etcd_endpoints, tls=settings.tls, on_health=metrics.etcd_up.set)


def node_parts(settings: AgentSettings, registry: CollectorRegistry | None = None) -> AgentParts:
    metrics = AgentMetrics(registry if registry is not None else CollectorRegistry())
    store = agent_store(settings.store, metrics)
    device = settings.device
    if device.backend == "memory":
        return AgentParts(store, SimulatedHost(), metrics, device=MemoryBackend(interface_name=device.interface))
    return AgentParts(
        store,
        NodeHost(),
        metrics,
        make_device=lambda: create_backend(
            device.backend,
            device.interface,
            wireguard_go=device.wireguard_go,
            start_wireguard_go=device.start_wireguard_go,
        ),
    )
