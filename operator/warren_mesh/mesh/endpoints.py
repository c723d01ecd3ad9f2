"""Endpoints seen rather than said: how nodes behind NAT are found (docs/nat.md). Pure: the agent reads its device
and the view, and publishes what these functions give.

A node behind NAT says an address nobody can dial (its private one). When it sends to a peer (it dials the
peers' public endpoints; persistent keepalive keeps it doing so), the peer's WireGuard takes the packets' source
as the node's endpoint (roaming). Every agent publishes, in its own record, where it sees peers whose source
differs from what their records say; a node that most observers see elsewhere than it says takes that endpoint as
its own. Nodes behind two different NATs then dial each other at those endpoints, and each NAT lets the other's
packets in once its own node has sent to them (which both do, retrying handshakes), provided the NATs keep a
node's port the same whatever it sends to (endpoint-independent mapping, as Linux's masquerade does).

Observations come from other nodes, and a node may lie. So the honest count too: once anyone says a node is
elsewhere than its record says (the node is contested), every observer that hears the node where its record says
from then on publishes that too (a confirmation). A new endpoint wins only with more observers than see the node
where its record says, one vote per observer: one liar among honest observers never moves a node. An observer
pokes a contested node it has not heard since (a datagram through the tunnel, which WireGuard answers with a
keepalive within 10 s), and the agent adopts a winner only once it has won for longer than that takes
(``ADOPT_AFTER``), so a lie cannot win before the confirmations arrive. Only what an observer heard after it saw
the contest counts as a confirmation: after a NAT rebinding, a peer that cannot hear the node any more must not
vouch for the endpoint it heard it at before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.node_fields import MAX_OBSERVED_ENDPOINTS
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import NodeRecord
from warren_mesh.values.device import DeviceState

# An observer votes for where it has heard a node from within this long: two of the persistent keepalives
# (25 s by default) a node sends even when idle, which a mesh with nodes behind NAT needs on anyway. A device's
# endpoint for a peer says where its last authenticated packet came from, which may be minutes ago: after a NAT
# forgot its mapping, a peer that hears nothing any more must not vouch for the old endpoint.
HEARD_WITHIN = 60.0
# How often an observer pokes a contested node it has not heard since the contest began.
POKE_EVERY = 4.0
# How long an endpoint must keep winning before a node takes it: longer than an honest observer takes to see the
# contest (its peers loop runs every 2 s), poke the node, hear WireGuard's answer (a keepalive within 10 s of the
# data: KEEPALIVE_TIMEOUT), notice it (the next loop) and publish (milliseconds through etcd), with a poke lost.
ADOPT_AFTER = 20.0


def contested(view: MeshReader) -> set[str]:
    """Nodes that some other node says it sees elsewhere than their records say."""
    names: set[str] = set()
    for observer, entry in view.nodes.items():
        for name, endpoint in entry.record.observed_endpoints:
            target = view.nodes.get(name)
            if name != observer and target is not None and endpoint not in _said(target.record):
                names.add(name)
    return names


def observations(
    device: DeviceState,
    names: Mapping[str, str],
    view: MeshReader,
    *,
    heard: Mapping[str, float],
    contested_since: Mapping[str, float],
    now: float,
) -> tuple[tuple[str, Endpoint], ...]:
    """Where this device sees the nodes it has heard from lately (``heard``: public key -> when its received bytes
    last grew), as this node publishes it (name, endpoint): every node seen elsewhere than its record says, and
    every contested node (``contested_since``: name -> when this node saw the contest begin) heard where its record
    says since the contest began (a confirmation). Elsewhere first when there are more than a record holds."""
    elsewhere: list[tuple[str, Endpoint]] = []
    confirmed: list[tuple[str, Endpoint]] = []
    for key, spec in device.peers.items():
        name = names.get(key)
        entry = view.nodes.get(name) if name is not None else None
        heard_at = heard.get(key)
        if entry is None or spec.endpoint is None or heard_at is None or entry.record.public_key != key:
            continue
        if now - heard_at > HEARD_WITHIN:
            continue
        record = entry.record
        if spec.endpoint in _said_texts(record):
            # Where its record says (a gateway is seen at its external endpoint from other locations).
            since = contested_since.get(record.name)
            if since is not None and heard_at > since:
                confirmed.append((record.name, Endpoint.parse(spec.endpoint)))
            continue
        try:
            elsewhere.append((entry.record.name, Endpoint.parse(spec.endpoint)))
        except RecordError:
            continue  # an endpoint a record could not carry (the device's own oddity): not worth publishing
    kept = (sorted(elsewhere) + sorted(confirmed))[:MAX_OBSERVED_ENDPOINTS]
    return tuple(sorted(kept, key=lambda item: item[0]))


def public_endpoint(view: MeshReader, name: str) -> Endpoint | None:
    """The endpoint more observers see ``name`` at than see it where its record says (a tie between other
    endpoints goes to the lowest), or None. One vote per observer; what ``name`` says of itself does not count."""
    entry = view.nodes.get(name)
    if entry is None:
        return None
    votes: Counter[str] = Counter()
    seen: dict[str, Endpoint] = {}
    for observer, other in view.nodes.items():
        if observer == name:
            continue
        for observed, endpoint in other.record.observed_endpoints:
            if observed == name:
                votes[str(endpoint)] += 1
                seen[str(endpoint)] = endpoint
    # A vote counts against the record's endpoint of its own family (a dual-stack node has one of each).
    own = {e.host.version: text for e, text in zip(entry.record.endpoints, entry.record.endpoint_texts, strict=True)}
    said = _said_texts(entry.record)
    rivals = {text: count for text, count in votes.items() if text not in said}
    if not rivals:
        return None
    winners = []
    for version in sorted({seen[text].host.version for text in rivals}):
        family = {text: count for text, count in rivals.items() if seen[text].host.version == version}
        best = max(family.values())
        if best > votes.get(own.get(version, ""), 0):
            winners.append((-best, min(text for text, count in family.items() if count == best)))
    return seen[min(winners)[1]] if winners else None


def _said(record: NodeRecord) -> tuple[Endpoint, ...]:
    """Where a node's record says it is: its endpoints, and those nodes of other locations dial."""
    return (*record.endpoints, *record.external_endpoints)


def _said_texts(record: NodeRecord) -> tuple[str, ...]:
    if not record.external_endpoints:
        return record.endpoint_texts
    return (*record.endpoint_texts, *(str(e) for e in record.external_endpoints))
