"""Endpoints seen rather than said: how nodes behind NAT are found (docs/nat.md). Pure: the agent reads its device
and the view, and publishes what these functions give.

A node behind NAT says an address nobody can dial (its private one). When it sends to a peer (it dials the
peers' public endpoints; persistent keepalive keeps it doing so), the peer's WireGuard takes the packets' source
as the node's endpoint (roaming). Every agent publishes, in its own record, where it sees peers whose source
differs from what their records say; a node that most observers see elsewhere than it says takes that endpoint as
its own. Nodes behind two different NATs then dial each other at those endpoints, and each NAT lets the other's
packets in once its own node has sent to them (which both do, retrying handshakes), provided the NATs keep a
node's port the same whatever it sends to (endpoint-independent mapping, as Linux's masquerade does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import MAX_OBSERVED_ENDPOINTS
from warren_mesh.values.device import DeviceState

# A session older than this carries nothing (WireGuard's REJECT_AFTER_TIME): its endpoint is history.
SESSION_LIFETIME = 180.0


def observed_elsewhere(
    device: DeviceState, names: Mapping[str, str], view: MeshReader, *, now: float
) -> tuple[tuple[str, Endpoint], ...]:
    """Nodes this device has a live session with at another endpoint than their records say: (name, endpoint)."""
    observed: list[tuple[str, Endpoint]] = []
    for key, spec in device.peers.items():
        name = names.get(key)
        entry = view.nodes.get(name) if name is not None else None
        stats = device.stats.get(key)
        if entry is None or spec.endpoint is None or stats is None or entry.record.public_key != key:
            continue
        if not stats.last_handshake or now - stats.last_handshake > SESSION_LIFETIME:
            continue
        if spec.endpoint != entry.record.endpoint_text:
            try:
                observed.append((entry.record.name, Endpoint.parse(spec.endpoint)))
            except RecordError:
                continue  # an endpoint a record could not carry (the device's own oddity): not worth publishing
    return tuple(sorted(observed, key=lambda item: item[0])[:MAX_OBSERVED_ENDPOINTS])


def public_endpoint(view: MeshReader, name: str) -> Endpoint | None:
    """Where the nodes that see ``name`` elsewhere than it says see it: the endpoint most of them name (a tie goes
    to the lowest), or None if nobody does. One lying node cannot outvote the others."""
    votes: Counter[str] = Counter()
    seen: dict[str, Endpoint] = {}
    for observer, entry in view.nodes.items():
        if observer == name:
            continue
        for observed, endpoint in entry.record.observed_endpoints:
            if observed == name:
                votes[str(endpoint)] += 1
                seen[str(endpoint)] = endpoint
    if not votes:
        return None
    best = max(votes.values())
    return seen[min(text for text, count in votes.items() if count == best)]
