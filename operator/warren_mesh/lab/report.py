"""What the lab says about its nodes: one value per node, as JSON or as the table `warren-mesh lab status` prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LabNode:
    """One lab node as `lab status` shows it."""

    name: str
    netns: str
    interface: str
    underlay_ips: tuple[str, ...]  # one per underlay family the lab gave it
    overlay_ips: tuple[str, ...]  # its device's addresses, one per overlay family (none: no device yet)
    peers: int
    handshaken: int  # peers with a completed handshake
    agent_running: bool
    agent_ready: bool  # its /healthz says so: the device was configured from a complete view of the mesh


@dataclass(frozen=True, slots=True)
class LabPod:
    """One lab pod as `lab pod list` shows it: a network namespace on a node's CNI network."""

    name: str
    node: str
    netns: str
    ip: str  # the first of ips
    ips: tuple[str, ...] = ()  # one per family of the pod network

    def __post_init__(self) -> None:
        if not self.ips:
            object.__setattr__(self, "ips", (self.ip,))


def pods_json(pods: list[LabPod]) -> str:
    return json.dumps([asdict(p) for p in pods], indent=2)


def render_pods_table(pods: list[LabPod]) -> str:
    rows = [("POD", "NODE", "NETNS", "IP"), *((p.name, p.node, p.netns, ",".join(p.ips)) for p in pods)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def status_json(status: list[LabNode]) -> str:
    return json.dumps([asdict(s) for s in status], indent=2)


def render_lab_table(status: list[LabNode]) -> str:
    header = ("NODE", "NETNS", "UNDERLAY", "OVERLAY", "PEERS", "HANDSHAKEN", "AGENT")
    rows = [
        (
            s.name,
            s.netns,
            ",".join(s.underlay_ips),
            ",".join(s.overlay_ips) or "-",
            str(s.peers),
            str(s.handshaken),
            ("ready" if s.agent_ready else "starting") if s.agent_running else "stopped",
        )
        for s in status
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def lagging_report(node: LabNode, want: int, tail: str) -> str:
    """What a node that has not joined the mesh has, and the end of its agent's log: the lab (and a test that uses
    it) removes its state directory when it fails, so this is what is left to diagnose with."""
    agent = "ready" if node.agent_ready else "not ready"
    head = f"{node.name}: {node.peers}/{want} peers, {node.handshaken} handshaken, agent {agent}; its log ends:"
    return f"{head}\n{tail}"


def log_tail(state_dir: Path, name: str, lines: int = 20) -> str:
    """The last ``lines`` lines of node ``name``'s agent log, indented."""
    try:
        log = (state_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        log = [f"(no log: {exc})"]
    return "\n".join(f"  {entry}" for entry in log)
