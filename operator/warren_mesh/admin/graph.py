"""``warren-mesh graph``: a picture of the mesh in Graphviz's DOT, from etcd and (where reachable) agents' metrics.

Nodes are boxes with their overlay address and pod subnet, external peers ellipses. Every pair of nodes is an
edge (the mesh is full); every external peer is joined to every node. An edge that an agent's metrics cover is
labelled with the handshake's age and the throughput as that agent sees it, and drawn red when it is stale: no
handshake yet, or none for longer than ``stale_after`` (180 s by default: WireGuard renews a session every two
minutes while anything flows, and the persistent keepalive keeps something flowing, so a live pair never gets
that old; after 180 s WireGuard itself refuses to use the session). Edges no agent reported on are grey.

With locations (docs/topology.md) each location is a cluster, its gateway drawn with a double border, and only
the pairs that talk directly are edges (inside a location, and between gateways); a pair that goes through a
relay is an orange dashed edge that names the relay.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from warren_mesh.admin.status import format_rate
from warren_mesh.mesh.paths import routing_of
from warren_mesh.mesh.view import MeshReader
from warren_mesh.metrics.reading import AgentReading, PeerReading

DEFAULT_STALE_AFTER = 180.0
NEWLINE = "\\n"  # a line break inside a DOT label
FORMATS = ("dot", "svg", "png")


class GraphError(RuntimeError):
    """The picture could not be drawn (Graphviz missing or failing); the message says what to do."""


@dataclass(frozen=True, slots=True)
class _Seen:
    observer: str
    reading: PeerReading


def _quote(text: str) -> str:
    """A DOT string. What goes in is names (DNS names), addresses and figures; a backslash is DOT's own
    (``\\n``, a line break), so only quotes are escaped."""
    return '"' + text.replace('"', '\\"') + '"'


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _rate(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else format_rate(bytes_per_second * 8)


def is_stale(reading: PeerReading, now: float, stale_after: float) -> bool:
    return reading.last_handshake <= 0 or now - reading.last_handshake > stale_after


def render_dot(
    view: MeshReader,
    readings: Sequence[AgentReading],
    *,
    now: float,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> str:
    """The mesh in DOT. ``readings``: what agents' metrics said (each about its own peers)."""
    keys = {entry.record.public_key: name for name, entry in view.nodes.items()}
    keys.update({entry.record.public_key: name for name, entry in view.peers.items()})
    seen: dict[frozenset[str], list[_Seen]] = {}
    for reading in readings:
        if reading.node not in view.nodes:
            continue  # an agent of another mesh, or one that left
        for key, peer in reading.peers.items():
            other = keys.get(key)
            if other is not None and other != reading.node:
                seen.setdefault(frozenset((reading.node, other)), []).append(_Seen(reading.node, peer))

    config = view.config
    networks = f"mesh {', '.join(map(str, config.overlay_cidrs))}, pods {', '.join(map(str, config.pod_cidrs))}"
    title = f"{networks}, etcd revision {view.revision}"
    lines = [
        "graph mesh {",
        f'  graph [overlap=false, splines=true, fontname="sans-serif", label={_quote(title)}];',
        '  node [fontname="sans-serif", fontsize=10];',
        '  edge [fontname="sans-serif", fontsize=8];',
    ]
    routing = routing_of(view)
    located = any(entry.record.location is not None for entry in view.nodes.values())
    clusters: dict[str | None, list[str]] = {}
    for name, entry in sorted(view.nodes.items()):
        record = entry.record
        gateway = located and record.location is not None and routing.is_gateway(name)
        texts = [name, *record.overlay_texts, *(str(n) for n in record.allowed_ips)]
        label = NEWLINE.join([*texts, f"gateway of {record.location}"] if gateway else texts)
        border = ", peripheries=2" if gateway else ""
        clusters.setdefault(record.location, []).append(f"{_quote(name)} [shape=box{border}, label={_quote(label)}];")
    for number, (location, members) in enumerate(sorted(clusters.items(), key=lambda c: c[0] or "")):
        if location is None:
            lines.extend(f"  {member}" for member in members)
            continue
        lines.append(f"  subgraph cluster_{number} {{")
        lines.append(f"    label={_quote(f'location {location}')}; style=rounded;")
        lines.extend(f"    {member}" for member in members)
        lines.append("  }")
    for name, external in sorted(view.peers.items()):
        label = NEWLINE.join([name, *(str(n) for n in external.record.allowed_ips)])
        lines.append(f"  {_quote(name)} [shape=ellipse, style=dashed, label={_quote(label)}];")
    nodes = sorted(view.nodes)
    pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :]]
    pairs += [(member, node) for member in sorted(view.peers) for node in nodes]
    families = {name: {e.host.version for e in entry.record.endpoints} for name, entry in view.nodes.items()}
    for a, b in pairs:
        if a in view.nodes and b in view.nodes and not routing.direct(a, b):
            continue  # through their gateways
        attributes = _edge_attributes(seen.get(frozenset((a, b)), []), now, stale_after)
        if a in families and b in families and not families[a] & families[b]:
            attributes = ' [color=grey, style=dashed, label="no underlay family in common"]'  # never dialled
        relay = routing.relays.get((min(a, b), max(a, b)))
        if relay is not None:
            attributes = f" [color=orange, style=dashed, label={_quote(f'relayed through {relay}')}]"
        lines.append(f"  {_quote(a)} -- {_quote(b)}{attributes};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edge_attributes(seen: list[_Seen], now: float, stale_after: float) -> str:
    if not seen:
        return " [color=grey, style=dotted]"
    parts = []
    stale = False
    for item in sorted(seen, key=lambda s: s.observer):
        reading = item.reading
        stale = stale or is_stale(reading, now, stale_after)
        handshake = (
            "no handshake" if reading.last_handshake <= 0 else f"handshake {_age(now - reading.last_handshake)} ago"
        )
        parts.append(
            f"{item.observer}: {handshake}, in {_rate(reading.receive_bytes_per_second)}, "
            f"out {_rate(reading.transmit_bytes_per_second)}"
        )
    color = "red" if stale else "darkgreen"
    return f" [color={color}, penwidth={2 if stale else 1}, label={_quote(NEWLINE.join(parts))}]"


def draw(dot: str, fmt: str, *, dot_binary: str = "dot") -> bytes:
    """``dot`` rendered by Graphviz as ``fmt`` (svg, png); DOT itself is returned as is."""
    if fmt == "dot":
        return dot.encode()
    if fmt not in FORMATS:
        raise GraphError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    try:
        done = subprocess.run([dot_binary, f"-T{fmt}"], input=dot.encode(), capture_output=True, check=False)
    except FileNotFoundError:
        raise GraphError(
            "Graphviz is not installed (Debian: apt-get install graphviz); --format dot needs none"
        ) from None
    if done.returncode != 0:
        raise GraphError(f"dot -T{fmt} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout
