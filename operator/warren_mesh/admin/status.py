"""``warren-mesh status``: the mesh as etcd holds it, judged by the same rules the agents apply."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warren_mesh.admin.reading import read_view_judged
from warren_mesh.mesh.changes import Rejection
from warren_mesh.mesh.paths import routing_of
from warren_mesh.metrics.reading import read_agent_metrics
from warren_mesh.store.base import Store
from warren_mesh.values.keyspace import KeySchema


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    public_key: str
    endpoints: tuple[str, ...]  # one per underlay family, preferred first
    overlay_ips: tuple[str, ...]  # one per overlay network
    listen_port: int
    lease_seconds_left: int  # -1: the record has no live lease
    published_at: float
    location: str | None = None  # docs/topology.md
    gateway: bool = False  # its location's gateway (every node without a location is its own)

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "gateway": self.gateway,
            "name": self.name,
            "public_key": self.public_key,
            "endpoint": self.endpoints[0],
            "endpoints": list(self.endpoints),
            "overlay_ip": self.overlay_ips[0],
            "overlay_ips": list(self.overlay_ips),
            "listen_port": self.listen_port,
            "lease_seconds_left": self.lease_seconds_left,
            "published_at": self.published_at,
        }


@dataclass(frozen=True, slots=True)
class MeshStatus:
    nodes: tuple[NodeStatus, ...]
    rejected: tuple[Rejection, ...]
    revision: int
    # Public key -> (receive, transmit) bits per second as one agent sees its peers (empty: not asked/reachable).
    traffic: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    traffic_from: str = ""  # the agent those figures come from
    # Pairs of nodes with no underlay family in common (an IPv4-only and an IPv6-only node): never dialled.
    unreachable: tuple[tuple[str, str], ...] = ()
    relayed: tuple[tuple[str, str, str], ...] = ()  # (a, b, relay): pairs that cannot talk directly
    located: bool = False  # some node names a location: status shows locations and gateways


def read_agent_traffic(metrics_url: str, timeout: float = 2.0) -> dict[str, tuple[float, float]]:
    """Per-peer throughput from an agent's /metrics, in bits per second (its averaged gauges are in bytes per
    second, Prometheus' base unit; people read links in bits); raises OSError or ValueError when the agent cannot
    be read."""
    if not metrics_url.startswith(("http://", "https://")):
        raise ValueError(f"--agent-metrics {metrics_url!r} is not an http(s) URL")
    reading = read_agent_metrics(metrics_url, timeout)
    return {
        key: (peer.receive_bytes_per_second * 8, (peer.transmit_bytes_per_second or 0.0) * 8)
        for key, peer in reading.peers.items()
        if peer.receive_bytes_per_second is not None
    }


async def read_status(store: Store, schema: KeySchema) -> MeshStatus:
    view, rejected = await read_view_judged(store, schema)
    leases = sorted({entry.lease for entry in view.nodes.values() if entry.lease})
    left = dict(zip(leases, await asyncio.gather(*(store.lease_time_left(lease) for lease in leases)), strict=True))
    routing = routing_of(view)
    nodes = tuple(
        NodeStatus(
            name=name,
            public_key=entry.record.public_key,
            endpoints=entry.record.endpoint_texts,
            overlay_ips=entry.record.overlay_texts,
            listen_port=entry.record.listen_port,
            lease_seconds_left=left.get(entry.lease, -1),
            published_at=entry.record.published_at,
            location=entry.record.location,
            gateway=routing.is_gateway(name),
        )
        for name, entry in sorted(view.nodes.items())
    )
    families = {name: {e.host.version for e in entry.record.endpoints} for name, entry in view.nodes.items()}
    unreachable = tuple((a, b) for a, b in itertools.combinations(sorted(families), 2) if not families[a] & families[b])
    relayed = tuple((a, b, relay) for (a, b), relay in sorted(routing.relays.items()))
    located = any(n.location is not None for n in nodes)
    return MeshStatus(nodes, rejected, view.revision, unreachable=unreachable, relayed=relayed, located=located)


def format_rate(bits_per_second: float) -> str:
    """A link's rate as people read it: 1.2 Gbit/s, 340.0 Mbit/s, 12 bit/s."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:.1f} {unit}"
    return f"{bits_per_second:.0f} bit/s"


def render_table(status: MeshStatus) -> str:
    header: tuple[str, ...] = ("NODE", "OVERLAY IP", "ENDPOINT", "PUBLIC KEY", "LEASE LEFT")
    if status.located:
        header = (*header, "LOCATION", "ROLE")
    if status.traffic:
        header = (*header, "RX", "TX")
    rows: list[tuple[str, ...]] = []
    for n in status.nodes:
        row: tuple[str, ...] = (
            n.name,
            ",".join(n.overlay_ips),
            ",".join(n.endpoints),
            n.public_key[:10] + "…",
            f"{n.lease_seconds_left}s",
        )
        if status.located:
            row = (*row, n.location or "-", "gateway" if n.gateway and n.location else "member")
        if status.traffic:
            rates = status.traffic.get(n.public_key)
            row = (*row, *((format_rate(rates[0]), format_rate(rates[1])) if rates is not None else ("-", "-")))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.append(f"{len(status.nodes)} node(s) at etcd revision {status.revision}")
    if status.traffic:
        lines.append(f"RX/TX: throughput to and from each peer as seen by the agent at {status.traffic_from}")
    lines.extend(f"rejected {r.key}: {r.reason}: {r.message}" for r in status.rejected)
    lines.extend(f"no underlay family in common: {a} and {b} (never dialled)" for a, b in status.unreachable)
    lines.extend(f"relayed: {a} and {b} cannot talk directly, through {relay}" for a, b, relay in status.relayed)
    return "\n".join(lines)


def render_json(status: MeshStatus) -> str:
    nodes = []
    for n in status.nodes:
        doc = n.to_json()
        if n.public_key in status.traffic:
            doc["receive_bits_per_second"], doc["transmit_bits_per_second"] = status.traffic[n.public_key]
        nodes.append(doc)
    return json.dumps(nodes, indent=2)
