"""Report: the agent's control-plane metrics and its log lines about the mesh, fed from the values the stages
return (a batch observed, a pass done), never written from inside them."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

from warren_mesh.mesh import damping
from warren_mesh.mesh.changes import Changes
from warren_mesh.mesh.claims import Conflict
from warren_mesh.mesh.paths import PathSummary
from warren_mesh.mesh.usage import Level
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.trust.text import printable

log = logging.getLogger(__name__)

FLOOD_QUIET = 60.0  # seconds without a held-back update after which a node's next flood is logged again


class PassReport(NamedTuple):
    """What one decide-and-apply pass did."""

    # A NamedTuple, not a frozen dataclass: made once per watch batch or pass on every agent, and a tuple is built
    # in C (a frozen dataclass sets each field through object.__setattr__).

    ok: bool  # every device operation succeeded
    applied: Mapping[str, int]  # device changes by kind
    failed: int  # device operations that failed (the pod network's upkeep included)
    published: Mapping[str, float]  # node name -> publish time, of the records this pass folded in
    peers: int  # peers the device should have
    nodes: int  # nodes in the mesh as this node sees it (itself included)
    conflicts: tuple[Conflict, ...]  # records left out
    unreachable: tuple[str, ...]  # nodes sharing no underlay family with this one
    paths: PathSummary | None  # with locations, gateways or relays in play: how this node reaches the others
    rejected: Mapping[str, int]  # keys whose current value is rejected, by reason
    seconds: float  # how long the pass took


class Reporter:
    def __init__(self, metrics: AgentMetrics, *, local_name: str) -> None:
        self._metrics = metrics
        self._local_name = local_name
        self._unreachable: tuple[str, ...] = ()
        self._relayed: dict[str, str] = {}  # node -> its relay
        self._gateway: str | None = None  # the gateway of this node's location, as last seen
        self._unrouted: tuple[str, tuple[str, ...]] | None = None  # (this node's location, nodes without a path)
        self._conflicts: set[tuple[str, str]] = set()  # reported already: each is logged when it starts
        self._over_quota: dict[str, Level] = {}  # node -> the quota level it is reported past
        self._flooding: dict[str, float] = {}  # node -> when an update of its record was last held back

    def observed(self, changes: Changes, events: int, quota: Mapping[str, tuple[Level, str] | None]) -> None:
        self._metrics.watch_events.inc(events)
        for rejection in changes.rejections:
            self._metrics.rejected_records.labels(rejection.reason).inc()
        for node, verdict in quota.items():
            self._report_quota(node, verdict)
        if changes.damped:
            self._report_damped(changes.damped)

    def _report_damped(self, names: tuple[str, ...]) -> None:
        """Count held-back updates; say so once per node and flood (again after a quiet ``FLOOD_QUIET`` s)."""
        self._metrics.damped_updates.inc(len(names))
        now = time.monotonic()
        for name in set(names):
            last = self._flooding.get(name)
            if last is None or now - last > FLOOD_QUIET:
                log.warning(
                    "node %s rewrites its record faster than %g times a second: its updates are applied at that "
                    "rate, the newest winning (warren_mesh_damped_updates_total)",
                    name,
                    damping.RATE,
                )
            self._flooding[name] = now

    def _report_quota(self, node: str, verdict: tuple[Level, str] | None) -> None:
        level = verdict[0] if verdict else None
        before = self._over_quota.get(node)
        if level == before:
            return
        if before is not None:
            self._metrics.over_quota.remove(node, before)
        if verdict is None:
            del self._over_quota[node]
            log.info("node %s is within its quota again", node)
            return
        self._over_quota[node] = verdict[0]
        self._metrics.over_quota.labels(node, verdict[0]).set(1)
        log.warning("node %s: %s", node, printable(verdict[1]))

    def watch_restarted(self, reason: str) -> None:
        self._metrics.watch_restarts.labels(reason).inc()

    def device_unreadable(self) -> None:
        self._metrics.apply_errors.inc()

    def pass_done(self, report: PassReport) -> None:
        metrics = self._metrics
        self._report_conflicts(report.conflicts)
        self._report_unreachable(report.unreachable)
        self._report_paths(report.paths)
        for kind, count in report.applied.items():
            metrics.applied_by_kind[kind].inc(count)
        if report.failed:
            metrics.apply_errors.inc(report.failed)
        applied_at = time.time()
        for name, published_at in report.published.items():
            if name != self._local_name:
                metrics.convergence_lag.observe(max(0.0, applied_at - published_at))
        if report.ok:
            metrics.peers.set(report.peers)
        metrics.nodes.set(report.nodes)
        metrics.report_invalid(dict(report.rejected))
        metrics.reconcile_duration.observe(report.seconds)

    def _report_unreachable(self, unreachable: tuple[str, ...]) -> None:
        """Pairs that share no underlay family (an IPv4-only node and an IPv6-only one) cannot talk directly: said
        once per change, and counted, never retried."""
        if unreachable != self._unreachable:
            if unreachable:
                log.warning(
                    "no underlay family in common with %s: configured without an endpoint, never dialled",
                    ", ".join(unreachable),
                )
            self._unreachable = unreachable
            self._metrics.unreachable_peers.set(len(unreachable))

    def _report_paths(self, paths: PathSummary | None) -> None:
        """Relayed pairs and nodes without a path (no gateway at one end): said once per change, and counted."""
        gateway = paths.gateway if paths is not None else None
        if gateway != self._gateway:
            if self._gateway is not None and paths is not None and not paths.location.startswith("node:"):
                self._metrics.gateway_changes.inc()
                log.info("location %s's gateway is %s, was %s", paths.location, gateway or "(none)", self._gateway)
            self._gateway = gateway
        relayed = dict(paths.relayed) if paths is not None else {}
        unrouted = (paths.location, paths.unrouted) if paths is not None and paths.unrouted else None
        if relayed != self._relayed:
            for name, relay in sorted(relayed.items()):
                if self._relayed.get(name) != relay:
                    log.warning("%s cannot be reached directly (both say so): through %s", name, relay)
            for name in sorted(self._relayed.keys() - relayed.keys()):
                log.info("%s is reached directly again", name)
            self._relayed = relayed
            self._metrics.relayed_peers.set(len(relayed))
        if unrouted != self._unrouted:
            if unrouted is not None:
                location, names = unrouted
                log.warning("no path to %s: location %s or theirs has no gateway", ", ".join(names), location)
            elif self._unrouted is not None:
                log.info("a path to every node again")
            self._metrics.unrouted_peers.set(len(unrouted[1]) if unrouted is not None else 0)
            self._unrouted = unrouted

    def _report_conflicts(self, conflicts: tuple[Conflict, ...]) -> None:
        current = {(c.name, c.reason) for c in conflicts}
        self._metrics.report_conflicting(dict(Counter(reason for _, reason in current)))
        for conflict in conflicts:
            if (conflict.name, conflict.reason) not in self._conflicts:
                log.warning("left out of the mesh: %s", conflict.message)
                self._metrics.conflicts.labels(conflict.reason).inc()
        self._conflicts = current
