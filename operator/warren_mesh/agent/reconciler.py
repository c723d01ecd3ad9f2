"""Decide and apply: turn the mesh view into device changes, touching only what differs.

Edge-triggered for speed (every watch batch marks the view dirty and a pass runs at once; batches that arrive
during a pass are folded into the next one), level-triggered for safety (a pass also runs every resync interval
and repairs a device that drifted; it changes nothing when nothing differs). A change the device refuses is
counted and retried on a later pass; it never stops the others from being applied.

An edge-triggered pass costs what the change touched, not what the mesh holds: the topology is updated for the
records the watch batch changed, and the plan covers only the peers that differ from what was applied last, so
the device is not read back. The first pass, every periodic resync, the pass after any failure and the pass after
a data-plane restart read the whole device and compare everything (``verify``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TypeVar

from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.pod_network import PodNetwork
from warren_mesh.device import InterfaceSpec, PeerSpec
from warren_mesh.keys import NodeKey
from warren_mesh.mesh.claims import Conflict, LocalNode
from warren_mesh.mesh.peers import MeshView
from warren_mesh.mesh.plan import PeerChange, Plan, plan_changes, plan_delta
from warren_mesh.mesh.topology import Topology, TopologyBuilder
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import DeviceSettings
from warren_mesh.wireguard.backend import Backend, BackendError

log = logging.getLogger(__name__)

_A = TypeVar("_A")
_RETRY_AFTER_ERROR = 1.0  # seconds before a failed change is tried again


class Reconciler:
    def __init__(
        self,
        settings: DeviceSettings,
        *,
        view: MeshView,
        backend: Backend,
        local: LocalNode,
        key: NodeKey,
        metrics: AgentMetrics,
        auto_mtu: int,
        device_thread: DeviceThread,
        pod_network: PodNetwork | None = None,
    ) -> None:
        """``pod_network``: this node's pods' CNI network and forwarding, kept in place by every full pass."""
        self._device_thread = device_thread
        self._pod_network = pod_network
        self._view = view
        self._backend = backend
        self._key = key
        self._metrics = metrics
        self._builder = TopologyBuilder(local, auto_mtu=auto_mtu, fwmark=settings.fwmark)
        self._resync_interval = settings.resync_interval
        self._dirty = asyncio.Event()
        self._resync_timer: asyncio.TimerHandle | None = None
        self._verify_next = True  # the next pass reads the device and compares everything
        # What the device was last given (kept up to date change by change, never copied on the common path).
        self._applied_interface: InterfaceSpec | None = None
        self._applied_aggregates: tuple[str, ...] = ()
        self._applied_peers: dict[str, PeerSpec] = {}
        self._applied_names: dict[str, str] = {}
        self._conflicts: set[tuple[str, str]] = set()
        self._pass_lock = asyncio.Lock()  # a pass and a key switch never interleave
        self.passes = 0  # completed passes on a synced view; tests and health read it

    def peer_names(self) -> Mapping[str, str]:
        """Public key -> node or MeshPeer name, as last applied. The metrics thread only looks keys up in it (safe
        while the loop changes it); it never iterates."""
        return self._applied_names

    @property
    def rebuilds(self) -> int:
        """How often the topology was folded from scratch rather than updated (benchmarks read it)."""
        return self._builder.rebuilds

    def set_auto_mtu(self, auto_mtu: int) -> bool:
        """The underlay's MTU changed (``model.auto_mtu`` of it): with ``mtu: auto`` the device, and so the pods'
        CNI config, follow in the next pass. Whether the device's MTU changes."""
        if not self._builder.set_auto_mtu(auto_mtu):
            return False
        self.notify(verify=True)
        return True

    async def switch_key(self, key: NodeKey) -> bool:
        """Key rotation: the device takes ``key`` now, in a full pass (nothing else changes: peers keep their
        sessions' receive keys, and this node's next packet to each starts a handshake with the new key). Whether
        the pass applied everything."""
        async with self._pass_lock:
            self._key = key
            self._builder.set_local(dataclasses.replace(self._builder.local, public_key=key.public_key), self._view)
            self._verify_next = True
            return await self._reconcile()

    def notify(self, *, verify: bool = False) -> None:
        """The view changed (or, with ``verify``, the device may have): run a pass once the current one ends."""
        if verify:
            self._verify_next = True
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
        """One pass; True when every planned change was applied.

        The desired state is computed here on the event loop, where the view lives; reading and changing the
        device happen on the device thread.
        """
        async with self._pass_lock:
            return await self._reconcile()

    async def _reconcile(self) -> bool:
        started = time.perf_counter()
        view = self._view
        builder = self._builder
        affected = builder.update(view, view.take_changes())
        self._report_conflicts(builder.conflicts)
        verify = self._verify_next or self._applied_interface is None
        # Until this pass succeeds, the device may differ from what was applied: the next one must look.
        self._verify_next = True
        if verify or affected is None:
            ok = await self._compare_everything(view.synced)
            if ok is None:
                return False
        else:
            assert self._applied_interface is not None  # verify is False only after a full comparison
            plan = plan_delta(
                self._applied_peers,
                builder.peers,
                affected,
                interface_address=self._applied_interface.address,
                aggregates=self._applied_aggregates,
            )
            names = {k: n for k in affected if (n := builder.names.get(k) or self._applied_names.get(k))}
            ok = await self._device_thread.run(lambda: self._apply(plan, names))
            for change in plan.changes:
                if change.action == "remove":
                    self._applied_peers.pop(change.public_key, None)
                    self._applied_names.pop(change.public_key, None)
                else:
                    self._applied_peers[change.public_key] = change.spec
                    self._applied_names[change.public_key] = builder.names[change.public_key]
        self._verify_next = not ok
        applied_at = time.time()
        for name, published_at in view.take_published().items():
            if name != builder.local_name:
                self._metrics.convergence_lag.observe(max(0.0, applied_at - published_at))
        if ok:
            self._metrics.peers.set(len(builder.peers))
        self._metrics.nodes.set(1 + builder.nodes_taken)
        self._metrics.report_invalid(view.rejected_by_reason())
        self._metrics.reconcile_duration.observe(time.perf_counter() - started)
        self.passes += 1
        return ok

    async def _compare_everything(self, synced: bool) -> bool | None:
        """Read the device and plan against it; whether every change was applied, None if it was unreadable."""
        desired = self._builder.topology()
        previous = None
        if self._applied_interface is not None:
            previous = Topology(
                self._applied_interface, self._applied_peers, self._applied_names, aggregates=self._applied_aggregates
            )
        try:
            device = await self._device_thread.run(self._backend.read)
        except BackendError as exc:
            # The device is unreadable (e.g. wireguard-go just died): the watchdog restarts it; retry later.
            self._metrics.apply_errors.inc()
            log.error("cannot read the WireGuard device (retrying): %s", exc)
            return None
        plan = plan_changes(
            desired, device, local_public_key=self._key.public_key, previous=previous, remove_unknown=synced
        )
        names = {**self._applied_names, **desired.names}
        ok = await self._device_thread.run(lambda: self._apply(plan, names))
        pods = self._pod_network
        if pods is not None:
            # Not part of ``ok``: a failure here (no nftables, a read-only /proc) is logged and counted, and the
            # next resync tries again; retrying every second would only repeat the same error.
            mtu = desired.interface.mtu
            if not await self._device_thread.run(lambda: pods.ensure(self._view.config, mtu)):
                self._metrics.apply_errors.inc()
        self._applied_interface = desired.interface
        self._applied_aggregates = desired.aggregates
        self._applied_peers = dict(desired.peers)
        self._applied_names = dict(desired.names)
        return ok

    def _apply(self, plan: Plan, names: Mapping[str, str]) -> bool:
        if plan.empty:
            return True
        if log.isEnabledFor(logging.INFO):  # explaining costs more than applying to the memory device
            log.info("applying:\n%s", plan.explain(names))
        applied: Counter[str] = Counter()  # counted here, added to the metrics once per pass (a lock each)
        if plan.set_private_key:
            self._attempt("private_key", self._backend.set_private_key, self._key, applied)
        if plan.interface is not None:
            self._attempt("interface", self._backend.configure_interface, plan.interface, applied)
        # Routes come after their peers and leave after them: traffic is routed into the device only while a peer
        # is there to take it. Peers are set before others leave: allowed IPs moving from a leaving peer to another
        # (a node's new key, docs/key-rotation.md) always have one of them to go to.
        upserts = [change for change in plan.changes if change.action != "remove"]
        # One device transaction for several (a cold start's thousand peers); peer by peer if that fails.
        if len(upserts) < 2 or not self._set_all(upserts, applied):
            for change in upserts:
                self._attempt(change.action, self._backend.set_peer, change.spec, applied)
        for network in plan.routes_to_add:
            self._attempt("add_route", self._backend.add_route, network, applied)
        for change in plan.changes:
            if change.action == "remove":
                self._attempt(change.action, self._backend.remove_peer, change.spec, applied)
        for network in plan.routes_to_remove:
            self._attempt("remove_route", self._backend.remove_route, network, applied)
        for kind, count in applied.items():
            self._metrics.applied_by_kind[kind].inc(count)
        return applied.total() == plan.size

    def _set_all(self, upserts: list[PeerChange], applied: Counter[str]) -> bool:
        """All peers in one go; False (nothing counted) if the device refused, to go peer by peer instead: one bad
        peer must not hold up the others."""
        try:
            self._backend.set_peers([change.spec for change in upserts])
        except BackendError as exc:
            log.warning("setting %d peers at once failed (%s); setting them one by one", len(upserts), exc)
            return False
        for change in upserts:
            applied[change.action] += 1
        return True

    def _attempt(self, kind: str, operation: Callable[[_A], None], argument: _A, applied: Counter[str]) -> None:
        try:
            operation(argument)
        except BackendError as exc:
            self._metrics.apply_errors.inc()
            log.error("device change %s failed (retrying): %s", kind, exc)
        else:
            applied[kind] += 1

    def _report_conflicts(self, conflicts: tuple[Conflict, ...]) -> None:
        current = {(c.name, c.reason) for c in conflicts}
        self._metrics.report_conflicting(dict(Counter(reason for _, reason in current)))
        for conflict in conflicts:
            if (conflict.name, conflict.reason) not in self._conflicts:
                log.warning("left out of the mesh: %s", conflict.message)
                self._metrics.conflicts.labels(conflict.reason).inc()
        self._conflicts = current
