"""Per-peer traffic metrics, read from the WireGuard device when Prometheus scrapes.

The counters come straight from the device at scrape time (nothing is cached between scrapes, so a scrape always
shows what the device says now, and a removed peer's series simply stop). The bytes-per-second gauges are the one
exception: a rate needs two readings, so the agent feeds a short sliding window of device readings
(``TrafficWindow``) and the gauges report the average over it. Dashboards should use ``rate()`` on the counters;
the gauges are for a glance at /metrics or ``warren-mesh status`` without a Prometheus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from warren_mesh.values.device import DeviceState, PeerStats

log = logging.getLogger(__name__)

PEER_LABELS = ("peer", "public_key")


class TrafficWindow:
    """Device byte counters over the last ``window`` seconds, for average throughput per peer.

    Fed by the agent every few seconds from its event loop; read by the metrics thread, hence the lock.
    """

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, Mapping[str, PeerStats]]] = deque()
        self._lock = threading.Lock()

    def add(self, at: float, stats: Mapping[str, PeerStats]) -> None:
        with self._lock:
            self._samples.append((at, stats))
            # Keep one sample at or before the window's start, so the average spans the whole window.
            while len(self._samples) > 2 and self._samples[1][0] <= at - self.window:
                self._samples.popleft()

    def rates(self) -> dict[str, tuple[float, float]]:
        """Public key -> (receive, transmit) in bytes per second (Prometheus' base unit), averaged over the
        window; peers seen in both the oldest and newest sample only. A counter that went down (peer re-added,
        daemon restarted) counts from 0."""
        with self._lock:
            if len(self._samples) < 2:
                return {}
            (t0, old), (t1, new) = self._samples[0], self._samples[-1]
        elapsed = t1 - t0
        if elapsed <= 0:
            return {}
        rates = {}
        for key, now in new.items():
            then = old.get(key)
            if then is None:
                continue
            rx = now.receive_bytes - then.receive_bytes
            tx = now.transmit_bytes - then.transmit_bytes
            rates[key] = (
                (rx if rx >= 0 else now.receive_bytes) / elapsed,
                (tx if tx >= 0 else now.transmit_bytes) / elapsed,
            )
        return rates


class PeerCollector(Collector):
    """A prometheus-client collector that reads the device on every scrape.

    ``read_device`` returns the device as it is now (it runs on the device thread); ``peer_names`` maps public
    keys to node or MeshPeer names, from the topology the agent last applied.
    """

    def __init__(
        self,
        read_device: Callable[[], DeviceState],
        peer_names: Callable[[], Mapping[str, str]],
        window: TrafficWindow,
    ) -> None:
        self._read_device = read_device
        self._peer_names = peer_names
        self._window = window

    def describe(self) -> Iterator[Metric]:
        # Registering must not read the device (it may not exist yet): describe by name only.
        return iter(_Families.empty())

    def collect(self) -> Iterator[Metric]:
        families = _Families.empty()
        started = time.perf_counter()
        try:
            device = self._read_device()
        except Exception as exc:  # a scrape must answer even when the device is gone (or the thread is stuck)
            log.warning("metrics: cannot read the WireGuard device: %s", exc)
            families.device_up.add_metric([], 0)
            yield families.device_up
            return
        read_seconds = time.perf_counter() - started
        names = self._peer_names()
        rates = self._window.rates()
        for key, spec in sorted(device.peers.items()):
            stats = device.stats.get(key, PeerStats())
            labels = [names.get(key, ""), key]
            families.receive_bytes.add_metric(labels, stats.receive_bytes)
            families.transmit_bytes.add_metric(labels, stats.transmit_bytes)
            families.last_handshake.add_metric(labels, stats.last_handshake)
            families.info.add_metric(
                labels, {"endpoint": spec.endpoint or "", "allowed_ips": ",".join(spec.allowed_ips)}
            )
            rate = rates.get(key)
            if rate is not None:
                families.receive_bps.add_metric(labels, rate[0])
                families.transmit_bps.add_metric(labels, rate[1])
        families.device_up.add_metric([], 1)
        families.read_duration.add_metric([], read_seconds)
        yield from families


class _Families(NamedTuple):
    receive_bytes: CounterMetricFamily
    transmit_bytes: CounterMetricFamily
    last_handshake: GaugeMetricFamily
    info: InfoMetricFamily
    receive_bps: GaugeMetricFamily
    transmit_bps: GaugeMetricFamily
    device_up: GaugeMetricFamily
    read_duration: GaugeMetricFamily

    @classmethod
    def empty(cls) -> _Families:
        labels = list(PEER_LABELS)
        return cls(
            receive_bytes=CounterMetricFamily(
                "warren_mesh_peer_receive_bytes", "Bytes received from the peer (device count).", labels=labels
            ),
            transmit_bytes=CounterMetricFamily(
                "warren_mesh_peer_transmit_bytes", "Bytes sent to the peer (device count).", labels=labels
            ),
            last_handshake=GaugeMetricFamily(
                "warren_mesh_peer_last_handshake_timestamp_seconds",
                "Unix time of the last completed handshake with the peer; 0 if none yet.",
                labels=labels,
            ),
            info=InfoMetricFamily(
                "warren_mesh_peer", "The peer as configured on the device: endpoint and allowed IPs.", labels=labels
            ),
            receive_bps=GaugeMetricFamily(
                "warren_mesh_peer_receive_bytes_per_second",
                "Receive throughput from the peer, averaged over the agent's short window (use rate() for graphs).",
                labels=labels,
            ),
            transmit_bps=GaugeMetricFamily(
                "warren_mesh_peer_transmit_bytes_per_second",
                "Transmit throughput to the peer, averaged over the agent's short window (use rate() for graphs).",
                labels=labels,
            ),
            device_up=GaugeMetricFamily(
                "warren_mesh_device_up", "1 when the last scrape could read the WireGuard device."
            ),
            read_duration=GaugeMetricFamily(
                "warren_mesh_device_read_duration_seconds", "Time the last scrape took to read the WireGuard device."
            ),
        )
