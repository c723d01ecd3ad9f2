"""Decide and apply, on a schedule: each pass folds what the observe stage saw (mesh/decision.py), carries the
plan out on the device (device_writer.py) and keeps the host's pod network in place, then hands a report on.

Edge-triggered for speed (every watch batch wakes a pass at once; batches that arrive during a pass are folded
into the next one), level-triggered for safety (a pass also runs every resync interval and repairs a device that
drifted; it changes nothing when nothing differs). A change the device refuses is counted and retried on a later
pass; it never stops the others from being applied.

An edge-triggered pass costs what the change touched, not what the mesh holds: the plan covers only the peers
that differ from what was applied last, so the device is not read back. The first pass, every periodic resync,
the pass after any failure and the pass after a data-plane restart read the whole device and compare everything.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.device_writer import DeviceWriter, Outcome
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.report import PassReport
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.changes import Changes
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.decision import Decider
from warren_mesh.mesh.paths import Paths
from warren_mesh.mesh.view import MeshReader
from warren_mesh.trust.records import MeshConfig
from warren_mesh.values.netaddr import IPAddress, IPNetwork
from warren_mesh.wireguard.backend import Backend, BackendError

log = logging.getLogger(__name__)

_RETRY_AFTER_ERROR = 1.0  # seconds before a failed change is tried again


class PodNetworkUpkeep(Protocol):
    """This node's pods' network on the host (host/pod_network.py), kept in place by every full pass."""

    def ensure(self, config: MeshConfig, mtu: int) -> bool: ...


class Reconciler:
    def __init__(
        self,
        *,
        view: MeshReader,
        decider: Decider,
        identity: Identity,
        backend: Backend,
        writer: DeviceWriter,
        device_thread: DeviceThread,
        resync_interval: float,
        report: Callable[[PassReport], None],
        on_device_unreadable: Callable[[], None],
        on_peers_added: Callable[[list[str]], None] = lambda _: None,
        pod_network: PodNetworkUpkeep | None = None,
    ) -> None:
        """``view``: read only (the observe stage owns it). ``on_peers_added``: told the public keys of the peers
        each pass added to the device (their first handshakes are watched: first_handshake.py)."""
        self._view = view
        self._decider = decider
        self._identity = identity
        self._backend = backend
        self._writer = writer
        self._device_thread = device_thread
        self._resync_interval = resync_interval
        self._report = report
        self._on_device_unreadable = on_device_unreadable
        self._on_peers_added = on_peers_added
        self._pod_network = pod_network
        self._dirty = asyncio.Event()
        self._resync_timer: asyncio.TimerHandle | None = None
        self._pass_lock = asyncio.Lock()  # a pass and a key switch never interleave
        self.passes = 0  # completed passes on a synced view; tests and health read it

    def peer_names(self) -> Mapping[str, str]:
        return self._decider.peer_names

    @property
    def paths(self) -> Paths | None:
        """How this node reaches the others when locations, gateways or relays are in play (None: directly)."""
        return self._decider.paths

    @property
    def rebuilds(self) -> int:
        return self._decider.rebuilds

    def set_auto_mtu(self, auto_mtu: int) -> bool:
        """The underlay's MTU changed: with ``mtu: auto`` the device, and so the pods' CNI config, follow in the
        next pass. Whether the device's MTU changes."""
        if not self._decider.set_auto_mtu(auto_mtu):
            return False
        self._dirty.set()
        return True

    async def switch_key(self, key: NodeKey) -> bool:
        """Key rotation: this node's key is ``key`` from now on and the device takes it now, in a full pass
        (nothing else changes: peers keep their sessions' receive keys, and this node's next packet to each starts
        a handshake with the new key). Whether the pass applied everything."""
        async with self._pass_lock:
            self._identity.key = key
            self._decider.set_public_key(key.public_key, self._view)
            return await self._reconcile()

    @property
    def local(self) -> LocalNode:
        return self._decider.local

    def set_holdings(
        self, overlay_ips: tuple[IPAddress, ...], subnets: tuple[IPNetwork, ...], pod_network: PodNetworkUpkeep | None
    ) -> None:
        """Our registration holds other addresses or pod subnets now (the mesh gained a family): the device, the
        routes and the pods' network follow in the next pass, a full one."""
        self._decider.set_holdings(overlay_ips, subnets, self._view)
        self._pod_network = pod_network
        self._dirty.set()

    def notify(self, changes: Changes | None = None, *, verify: bool = False) -> None:
        """The view changed by ``changes`` (or, with ``verify``, the device may have): run a pass once the current
        one ends."""
        if changes is not None:
            self._decider.note(changes)
        if verify:
            self._decider.verify_next()
        self._dirty.set()

    async def run(self) -> None:
        self._resync_timer = asyncio.get_running_loop().call_later(self._next_resync(), self._resync)
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                if not self._view.synced:
                    continue  # nothing to compare against until the first snapshot
                if not await self.reconcile_once():
                    await asyncio.sleep(_RETRY_AFTER_ERROR)
                    self._dirty.set()
        finally:
            if self._resync_timer is not None:
                self._resync_timer.cancel()

    def _next_resync(self) -> float:
        # Jittered, so agents started together do not all read their devices at the same moment.
        return self._resync_interval * random.uniform(0.9, 1.1)

    def _resync(self) -> None:
        """The periodic resync: the next pass compares with the device as it is, however busy the mesh is. One
        timer per interval, not one per pass (a timer per pass was a tenth of a busy agent's loop)."""
        self.notify(verify=True)
        self._resync_timer = asyncio.get_running_loop().call_later(self._next_resync(), self._resync)

    async def reconcile_once(self) -> bool:
        """One pass; True when every planned change was applied. Deciding runs on the event loop, where the view
        lives; reading and changing the device on the device thread."""
        async with self._pass_lock:
            return await self._reconcile()

    async def _reconcile(self) -> bool:
        started = time.perf_counter()
        view, decider = self._view, self._decider
        fold = decider.fold(view)
        device = None
        if fold.needs_device:
            try:
                device = await self._device_thread.run(self._backend.read)
            except BackendError as exc:
                # The device is unreadable (e.g. wireguard-go just died): the watchdog restarts it; retry later.
                self._on_device_unreadable()
                log.error("cannot read the WireGuard device (retrying): %s", exc)
                return False
        decision = decider.decide(device, remove_unknown=view.synced)
        outcome = Outcome()  # nothing to do is not worth a trip to the device thread
        if not decision.plan.empty:
            outcome = await self._device_thread.run(lambda: self._writer.execute(decision.plan, decision.names))
            if outcome.added:
                self._on_peers_added(outcome.added)
        pods_failed = 0
        pods = self._pod_network
        if decision.full and pods is not None:
            # Not part of ``ok``: a failure here (no nftables, a read-only /proc) is logged and counted, and the
            # next resync tries again; retrying every second would only repeat the same error.
            config, mtu = view.config, decision.mtu
            pods_failed = 0 if await self._device_thread.run(lambda: pods.ensure(config, mtu)) else 1
        decider.settle(ok=outcome.ok)
        self.passes += 1
        self._report(
            PassReport(
                ok=outcome.ok,
                applied=outcome.applied,
                failed=outcome.failed + pods_failed,
                # A record folded in and deleted since is no longer there to have converged.
                published={n: t for n, t in fold.published.items() if n in view.nodes},
                peers=decider.peer_count,
                nodes=1 + decider.nodes_taken,
                conflicts=decider.conflicts,
                unreachable=decider.unreachable,
                paths=decider.path_summary,
                rejected=view.rejected_by_reason(),
                seconds=time.perf_counter() - started,
            )
        )
        return outcome.ok
