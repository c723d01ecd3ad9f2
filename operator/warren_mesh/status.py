"""``warren-mesh status``: the mesh as etcd holds it, judged by the same rules the agents apply."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from warren_mesh.mesh.peers import MeshView, Rejection
from warren_mesh.schema import KeySchema
from warren_mesh.store.etcd import EtcdStore


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    public_key: str
    endpoint: str
    overlay_ip: str
    listen_port: int
    lease_seconds_left: int  # -1: the record has no live lease
    published_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public_key": self.public_key,
            "endpoint": self.endpoint,
            "overlay_ip": self.overlay_ip,
            "listen_port": self.listen_port,
            "lease_seconds_left": self.lease_seconds_left,
            "published_at": self.published_at,
        }


@dataclass(frozen=True, slots=True)
class MeshStatus:
    nodes: tuple[NodeStatus, ...]
    rejected: tuple[Rejection, ...]
    revision: int


async def read_status(store: EtcdStore, schema: KeySchema) -> MeshStatus:
    rejected: list[Rejection] = []
    view = MeshView(schema, on_reject=rejected.append)
    view.apply(await store.list_prefix(schema.root))
    leases = sorted({entry.lease for entry in view.nodes.values() if entry.lease})
    left = dict(zip(leases, await asyncio.gather(*(store.lease_time_left(lease) for lease in leases)), strict=True))
    nodes = tuple(
        NodeStatus(
            name=name,
            public_key=entry.record.public_key,
            endpoint=str(entry.record.endpoint),
            overlay_ip=str(entry.record.overlay_ip),
            listen_port=entry.record.listen_port,
            lease_seconds_left=left.get(entry.lease, -1),
            published_at=entry.record.published_at,
        )
        for name, entry in sorted(view.nodes.items())
    )
    return MeshStatus(nodes, tuple(rejected), view.revision)


def render_table(status: MeshStatus) -> str:
    header = ("NODE", "OVERLAY IP", "ENDPOINT", "PUBLIC KEY", "LEASE LEFT")
    rows = [
        (n.name, n.overlay_ip, n.endpoint, n.public_key[:10] + "…", f"{n.lease_seconds_left}s") for n in status.nodes
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.append(f"{len(status.nodes)} node(s) at etcd revision {status.revision}")
    lines.extend(f"rejected {r.key}: {r.reason}: {r.message}" for r in status.rejected)
    return "\n".join(lines)


def render_json(status: MeshStatus) -> str:
    return json.dumps([n.to_json() for n in status.nodes], indent=2)
