"""Which peers this node should reach directly but cannot, said in its record (docs/topology.md#relays).

A peer it should talk to directly (every node in a mesh without locations; in one with them, its location's and,
for a gateway, the other gateways) is unreachable when the device has it with an endpoint for
``NO_HANDSHAKE_AFTER`` without any handshake (WireGuard tries every 5 s), when its last handshake is older than a
session lives without one being renewed (``STALE_AFTER``: renewed every 2 minutes while keepalives flow), or when
the two share no underlay family (no endpoint to dial at all). Silence counts only where the mesh's persistent
keepalive is on: without it an idle pair never handshakes. A pair that both say so goes through a relay; the
device keeps the direct peer, without allowed IPs, and WireGuard keeps trying it (every persistent keepalive), so
the first direct handshake that works again shows here, and the pair goes direct.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from warren_mesh.agent.publication import RecordPublisher
from warren_mesh.mesh.paths import Paths
from warren_mesh.mesh.view import MeshReader
from warren_mesh.values.device import DeviceState

log = logging.getLogger(__name__)

NO_HANDSHAKE_AFTER = 20.0  # seconds a direct peer is dialled without a handshake before it counts as unreachable
# WireGuard renews a session every 120 s while anything flows (keepalives do) and tries for 5 s at a time: a last
# handshake older than this says the renewal failed three times.
STALE_AFTER = 135.0


class Reachability:
    def __init__(
        self,
        publication: RecordPublisher,
        view: MeshReader,
        *,
        peer_names: Callable[[], Mapping[str, str]],
        paths: Callable[[], Paths | None],
    ) -> None:
        self._publication = publication
        self._view = view
        self._peer_names = peer_names
        self._paths = paths
        self._dialled_since: dict[tuple[str, str | None], float] = {}  # (public key, endpoint) -> first seen

    def unreachable(self, device: DeviceState, now: float) -> tuple[str, ...]:
        """The nodes this device should reach directly and cannot, by name."""
        paths = self._paths()
        names = self._peer_names()
        seen: dict[tuple[str, str | None], float] = {}
        found = []
        for key, spec in device.peers.items():
            name = names.get(key)
            entry = self._view.nodes.get(name) if name is not None else None
            if name is None or entry is None or entry.record.public_key != key:
                continue  # an external peer, or a node's announced next key
            if paths is not None and name not in paths.direct:
                continue
            since = seen[(key, spec.endpoint)] = self._dialled_since.get((key, spec.endpoint), now)
            stats = device.stats.get(key)
            handshake = stats.last_handshake if stats is not None else 0.0
            # Silence says something only where the persistent keepalive makes every pair talk (with it off, an
            # idle pair never handshakes at all).
            silent = bool(spec.persistent_keepalive) and (
                (handshake == 0.0 and now - since > NO_HANDSHAKE_AFTER)
                or (handshake != 0.0 and now - handshake > STALE_AFTER)
            )
            if spec.endpoint is None or silent:
                found.append(name)
        self._dialled_since = seen
        return tuple(sorted(found))

    async def publish(self, device: DeviceState, *, now: float | None = None) -> None:
        """Say in our record which peers we cannot reach directly (published only when that changed)."""
        await self._publication.set_unreachable(self.unreachable(device, time.time() if now is None else now))
