"""What one agent's ``/metrics`` says about its peers, read back by the commands that show the mesh (``status``,
``graph``): which node it is, and per peer the last handshake and the current throughput."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class PeerReading:
    last_handshake: float = 0.0  # Unix time; 0: none yet
    # None until the agent's throughput window has filled once
    receive_bytes_per_second: float | None = None
    transmit_bytes_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class AgentReading:
    node: str  # the agent's node name ("" if it did not say)
    peers: dict[str, PeerReading] = field(default_factory=dict)  # by public key


def parse_agent_metrics(text: str) -> AgentReading:
    """``ValueError`` if ``text`` is not a Prometheus exposition."""
    node = ""
    values: dict[str, dict[str, float]] = {}
    wanted = {
        "warren_mesh_peer_last_handshake_timestamp_seconds": "last_handshake",
        "warren_mesh_peer_receive_bytes_per_second": "receive_bytes_per_second",
        "warren_mesh_peer_transmit_bytes_per_second": "transmit_bytes_per_second",
    }
    for family in text_string_to_metric_families(text):
        # Info metrics are gauges named ..._info in the text format (the "info" type is OpenMetrics').
        if family.name in ("warren_mesh_agent", "warren_mesh_agent_info"):
            for sample in family.samples:
                node = sample.labels.get("node_name", node)
        attribute = wanted.get(family.name)
        if attribute is not None:
            for sample in family.samples:
                key = sample.labels.get("public_key")
                if key:
                    values.setdefault(key, {})[attribute] = sample.value
    return AgentReading(node, {key: PeerReading(**fields) for key, fields in values.items()})


def read_agent_metrics(url: str, timeout: float = 2.0) -> AgentReading:
    """``OSError`` when the agent cannot be reached, ``ValueError`` when the URL or the answer is not usable."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is not an http(s) URL")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
        return parse_agent_metrics(response.read().decode())
