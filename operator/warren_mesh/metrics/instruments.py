"""The agent's control-plane metrics, created on a registry the caller owns.

A registry per agent (rather than prometheus-client's global one) lets tests read values with
``get_sample_value`` and lets the benchmark run hundreds of agents in one process without their series mixing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from warren_mesh.trust.reasons import CONFLICT_REASONS, REJECTION_REASONS

APPLY_KINDS = ("add", "update", "remove", "interface", "private_key", "add_route", "remove_route")
# Why the watch was resumed on a new stream (store/etcd.py: EtcdStore.observe).
WATCH_RESTART_REASONS = ("error", "stalled", "compacted", "behind", "too_large")

# Convergence happens in milliseconds when healthy; the tail buckets catch an etcd outage or a slow backend.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.peers = Gauge("warren_mesh_peers", "Peers configured on the WireGuard device.", registry=registry)
        self.nodes = Gauge(
            "warren_mesh_nodes",
            "Nodes in the mesh as this agent applied it, itself included (registered nodes, not MeshPeers).",
            registry=registry,
        )
        self.invalid_records = Gauge(
            "warren_mesh_invalid_records",
            "Records in etcd whose current value is rejected, by reason: what needs fixing now.",
            ["reason"],
            registry=registry,
        )
        self.conflicting_records = Gauge(
            "warren_mesh_conflicting_records",
            "Valid records currently left out because they collide with an earlier one, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rejected_records = Counter(
            "warren_mesh_rejected_records",
            "Records in etcd that were not used, by reason (each version of a record counts once).",
            ["reason"],
            registry=registry,
        )
        self.conflicts = Counter(
            "warren_mesh_conflicts",
            "Valid records left out because they collide with an earlier one (key, address, allowed IPs).",
            ["reason"],
            registry=registry,
        )
        self.over_quota = Gauge(
            "warren_mesh_node_over_quota",
            "1 for each node past the soft or hard quota of keys and bytes under its own keys (README: Quotas); "
            "past the hard one the enroller takes its write permissions away.",
            ["owner", "level"],
            registry=registry,
        )
        self.watch_events = Counter(
            "warren_mesh_watch_events", "Events received from the etcd watch.", registry=registry
        )
        self.watch_restarts = Counter(
            "warren_mesh_watch_restarts",
            "Times the etcd watch was restarted, by reason (error, stalled, compacted, behind, too_large).",
            ["reason"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "warren_mesh_reconcile_duration_seconds",
            "Time to compute and apply one reconciliation.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.convergence_lag = Histogram(
            "warren_mesh_convergence_lag_seconds",
            "Time from a node record's publication to its application on this node's device.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.applied_changes = Counter(
            "warren_mesh_applied_changes",
            "Changes applied to the device, by kind (peers: add, update, remove; add_route, remove_route; interface, "
            "private_key).",
            ["kind"],
            registry=registry,
        )
        self.apply_errors = Counter(
            "warren_mesh_apply_errors",
            "Device changes that failed (retried on the next pass).",
            registry=registry,
        )
        self.etcd_up = Gauge(
            "warren_mesh_etcd_up",
            "1 when etcd answered the last request that needs its quorum (a key-value call, a lease refresh), else 0.",
            registry=registry,
        )
        self.unreachable_peers = Gauge(
            "warren_mesh_unreachable_peers",
            "Nodes this node shares no underlay IP family with (it IPv4-only, they IPv6-only, or the reverse): "
            "configured without an endpoint, never dialled.",
            registry=registry,
        )
        self.gateway = Gauge(
            "warren_mesh_gateway",
            "1 while this node is its location's gateway (docs/topology.md), else 0.",
            registry=registry,
        )
        self.gateway_give_ups = Counter(
            "warren_mesh_gateway_give_ups_total",
            "Times this node gave up as its location's gateway: no other location's gateway answered its probes.",
            registry=registry,
        )
        self.gateway_changes = Counter(
            "warren_mesh_gateway_changes_total",
            "Times the gateway of this node's location changed (a failover, or a candidate standing first).",
            registry=registry,
        )
        self.handshakes_started_over = Counter(
            "warren_mesh_handshakes_started_over_total",
            "Peers added again because the first handshakes of both ends crossed (agent/first_handshake.py): each "
            "would have waited WireGuard's 5 s retry.",
            registry=registry,
        )
        self.relayed_peers = Gauge(
            "warren_mesh_relayed_peers",
            "Nodes this node should reach directly but reaches through a relay (both said they cannot talk).",
            registry=registry,
        )
        self.unrouted_peers = Gauge(
            "warren_mesh_unrouted_peers",
            "Nodes this node has no path to: its location or theirs has no gateway (docs/topology.md).",
            registry=registry,
        )
        self.pod_subnet_missing = Gauge(
            "warren_mesh_pod_subnet_missing",
            "1 when this node registered without a pod subnet of this family (every subnet of the pod network is "
            "claimed), else 0.",
            ["family"],
            registry=registry,
        )
        self.etcd_certificate_expiry = Gauge(
            "warren_mesh_etcd_client_certificate_expiry_timestamp_seconds",
            "When the client certificate this agent uses for etcd expires (Unix time); absent without one.",
            registry=registry,
        )
        self.lease_keepalive_failures = Counter(
            "warren_mesh_lease_keepalive_failures",
            "Lease keepalives that failed (etcd away or the lease lost).",
            registry=registry,
        )
        self.key_rotations = Counter(
            "warren_mesh_key_rotations",
            "Times this node switched to a new WireGuard key (docs/key-rotation.md).",
            registry=registry,
        )
        self.registrations = Counter(
            "warren_mesh_registrations",
            "Times this agent (re-)registered its node record.",
            registry=registry,
        )
        self.damped_updates = Counter(
            "warren_mesh_damped_updates",
            "Updates of other nodes' records held back because their node rewrote its record faster than the "
            "damping rate (the newest is applied at that rate).",
            registry=registry,
        )
        self.surplus_claims_removed = Counter(
            "warren_mesh_surplus_claims_removed",
            "Claims of this node's that took nothing (it held an older one of their kind) and that it removed: "
            "someone else writes with its credential.",
            registry=registry,
        )
        self.info = Info("warren_mesh_agent", "The agent's node, backend and interface.", registry=registry)
        self._invalid_reported: dict[str, int] = {}
        self._conflicting_reported: dict[str, int] = {}
        # Every label value exists from the start at 0, so rate() and increase() see the first occurrence.
        for reason in REJECTION_REASONS:
            self.rejected_records.labels(reason)
            self.invalid_records.labels(reason)
        for reason in CONFLICT_REASONS:
            self.conflicts.labels(reason)
            self.conflicting_records.labels(reason)
        # labels() costs more than the change it counts on the memory device: look each child up once.
        self.applied_by_kind = {kind: self.applied_changes.labels(kind) for kind in APPLY_KINDS}
        for reason in WATCH_RESTART_REASONS:
            self.watch_restarts.labels(reason)

    def report_invalid(self, by_reason: dict[str, int]) -> None:
        if by_reason != self._invalid_reported:  # every pass reports; most passes change nothing here
            _set_by_reason(self.invalid_records, REJECTION_REASONS, by_reason)
            self._invalid_reported = dict(by_reason)

    def report_conflicting(self, by_reason: dict[str, int]) -> None:
        if by_reason != self._conflicting_reported:
            _set_by_reason(self.conflicting_records, CONFLICT_REASONS, by_reason)
            self._conflicting_reported = dict(by_reason)


def _set_by_reason(gauge: Gauge, known: tuple[str, ...], by_reason: dict[str, int]) -> None:
    """Set every reason's count, known ones without records back to 0 (a fixed record clears its alert)."""
    for reason in {*known, *by_reason}:
        gauge.labels(reason).set(by_reason.get(reason, 0))
