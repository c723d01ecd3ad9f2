"""This node's part as its location's gateway (docs/topology.md#gateways): standing, and giving up when it cannot
do the job.

A node with a location and an external endpoint stands: it writes its candidacy (mesh/candidacies.py) on the
lease its record lives on, so that it withdraws when the node dies. The oldest candidate is the gateway. While it
is, it probes the other locations' gateways through the tunnel every second (host/probe.py); when none of them
answered for the lease TTL + ``GIVE_UP_MARGIN`` (a few seconds: longer than a remote gateway that died takes to
be replaced, so that its death never makes this one give up), it deletes its candidacy and the next candidate
takes over at once. That is the case a liveness check cannot see (Kilo #489): the node up, its agent healthy,
its external link cut. It stands again after ``HOLD_DOWN_FACTOR`` times that, behind every candidate that stayed,
so a node that gave up or came back never takes the role back (no flapping).

A location's only candidate never gives up: nobody could take over (with two locations, the healthy end of a cut
link would otherwise give up too, and leave its location without a gateway). A remote gateway is judged once it
has answered a probe (so that a peer that does not answer probes, an older
agent or a firewall on the probe port, makes nobody give up) or has been silent since it became a gateway for
three times the bound (no gateway that reaches nobody keeps the role).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from warren_mesh.agent.publication import Registration
from warren_mesh.host.probe import PathProbe, probe_port
from warren_mesh.mesh.paths import Paths
from warren_mesh.mesh.view import MeshReader
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.store.base import Store, StoreError
from warren_mesh.values.keyspace import KeySchema

log = logging.getLogger(__name__)

PROBE_EVERY = 1.0  # seconds between probes of each remote gateway
GIVE_UP_MARGIN = 3.0  # seconds beyond the lease TTL a gateway waits for an answer from any remote gateway
HOLD_DOWN_FACTOR = 3  # a gateway that gave up stands again after this many times its bound


class GatewayRole:
    def __init__(
        self,
        *,
        store: Store,
        schema: KeySchema,
        name: str,
        location: Callable[[], str | None],
        can_stand: bool,
        view: MeshReader,
        registration: Callable[[], Registration | None],
        paths: Callable[[], Paths | None],
        probe: PathProbe | None,
        metrics: AgentMetrics,
    ) -> None:
        """``location``: this node's location now (--location, or the operator's word: it may change);
        ``can_stand``: this node has an external endpoint; ``probe``: None where nothing can be probed (memory
        devices): a gateway there never gives up."""
        self._store = store
        self._schema = schema
        self._name = name
        self._location_now = location
        self._location: str | None = None  # the location we stand for (or would)
        self._key: str | None = None
        self._can_stand = can_stand
        self._view = view
        self._registration = registration
        self._paths = paths
        self._probe = probe
        self._metrics = metrics
        self._standing: int | None = None  # the lease our candidacy is on
        self._hold_until = 0.0  # monotonic: no standing before (we gave up)
        self._remote_since: dict[str, float] = {}  # remote gateway -> since when it is one, while we are gateway
        self._was_gateway = False

    async def run(self) -> None:
        """Forever: stand when we may, and while gateway, probe and judge."""
        while True:
            try:
                await self.step(time.monotonic())
            except StoreError as exc:
                log.warning("gateway candidacy of %s: %s (trying again)", self._name, exc)
            await asyncio.sleep(PROBE_EVERY)

    async def step(self, now: float) -> None:
        registration = self._registration()
        if registration is None:
            self._standing = None
            return
        if self._probe is not None:  # every node answers probes, on the addresses it holds now
            record = registration.record
            await self._probe.open(record.overlay_ips, probe_port(record.listen_port))
        location = self._location_now()
        if location != self._location:
            if self._key is not None and self._standing is not None:
                await self._store.delete(self._key)  # we moved: no longer a candidate where we were
            self._location, self._standing = location, None
            self._key = self._schema.candidacy(self._name, location) if location is not None else None
        if self._key is None:
            return
        if self._standing != registration.lease_id or self._name not in self._view.gateway_candidacies:
            self._standing = None  # a new lease, or our candidacy gone (deleted by someone with our credential)
        if self._can_stand and self._standing is None and now >= self._hold_until:
            # A put keeps the key's create revision if it is there (moved from a lease we lost: our place in line
            # stays); written anew, we stand behind everyone.
            await self._store.put(self._key, b"", lease=registration.lease_id)
            self._standing = registration.lease_id
            log.info("%s stands as the gateway of location %s", self._name, self._location)
        paths = self._paths()
        gateway = paths is not None and self._location is not None and paths.gateways.get(self._location) == self._name
        if gateway != self._was_gateway:
            self._was_gateway = gateway
            self._metrics.gateway.set(1 if gateway else 0)
            log.info(
                "%s is %s the gateway of location %s", self._name, "now" if gateway else "no longer", self._location
            )
        if not gateway or paths is None or self._probe is None:
            self._remote_since.clear()
            return
        bound = registration.ttl + GIVE_UP_MARGIN
        if self._silent(paths, now, bound=bound) and self._someone_takes_over():
            await self._give_up(now, bound=bound)

    def _silent(self, paths: Paths, now: float, *, bound: float) -> bool:
        """Probe every remote gateway; whether those judged (see the module's docstring) all stayed silent for
        longer than ``bound`` (False when none is judged)."""
        assert self._probe is not None
        remote = {g for location, g in paths.gateways.items() if location != self._location and g != self._name}
        self._remote_since = {g: self._remote_since.get(g, now) for g in remote}
        judged = []
        for name, since in self._remote_since.items():
            entry = self._view.nodes.get(name)
            if entry is None:
                continue
            address = entry.record.overlay_ip
            self._probe.send(address, probe_port(entry.record.listen_port))
            answered = self._probe.answered.get(address, 0.0)
            if answered > since or now - since > 3 * bound:
                judged.append(max(since, answered))
        return bool(judged) and all(now - heard > bound for heard in judged)

    def _someone_takes_over(self) -> bool:
        """Whether another node of our location stands and can be its gateway: giving up without one would only
        cut the location off for good (and with two locations, the healthy end of a cut link would)."""
        for name, candidacy in self._view.gateway_candidacies.items():
            entry = self._view.nodes.get(name)
            record = entry.record if entry is not None and name != self._name else None
            eligible = record is not None and bool(record.external_endpoints)
            if eligible and record is not None and candidacy.location == record.location == self._location:
                return True
        return False

    async def _give_up(self, now: float, *, bound: float) -> None:
        assert self._key is not None
        log.warning(
            "%s gives up as the gateway of location %s: no other location's gateway answered for %.0f s; the next "
            "candidate takes over, and %s stands again in %.0f s",
            self._name,
            self._location,
            bound,
            self._name,
            HOLD_DOWN_FACTOR * bound,
        )
        await self._store.delete(self._key)
        self._metrics.gateway_give_ups.inc()
        self._standing = None
        self._hold_until = now + HOLD_DOWN_FACTOR * bound
        self._remote_since.clear()
