"""The per-peer collector and the throughput window, on hand-made device readings."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from warren_mesh.metrics.peer_collector import PeerCollector, TrafficWindow
from warren_mesh.values.device import DeviceState, PeerSpec, PeerStats

A, B = "A" * 43 + "=", "B" * 43 + "="


def _device(stats: dict[str, PeerStats]) -> DeviceState:
    peers = {key: PeerSpec(key, "192.0.2.1:51820", ("10.96.0.2/32",)) for key in (A, B)}
    return DeviceState(public_key=None, interface=None, peers=peers, stats=stats)


def test_window_averages_over_its_span_and_survives_a_counter_reset() -> None:
    window = TrafficWindow(window=10)
    assert window.rates() == {}
    window.add(0.0, {A: PeerStats(0, 0), B: PeerStats(5000, 0)})
    window.add(2.0, {A: PeerStats(1000, 500)})
    window.add(4.0, {A: PeerStats(2000, 1000), B: PeerStats(1000, 0)})  # B's counters went down: restarted
    rates = window.rates()
    assert rates[A] == (2000 / 4, 1000 / 4)  # bytes per second
    assert rates[B] == (1000 / 4, 0.0)


def test_window_forgets_samples_older_than_the_window() -> None:
    window = TrafficWindow(window=5)
    window.add(0.0, {A: PeerStats(0, 0)})
    for t in range(1, 21):
        window.add(float(t), {A: PeerStats(t * 100, 0)})
    # The oldest kept sample is the last one at or before t=15: the average covers exactly the window.
    assert window.rates()[A] == (500 / 5, 0.0)


def test_collector_reads_the_device_at_every_scrape() -> None:
    readings = [_device({A: PeerStats(100, 200, 1700000000.0)}), _device({A: PeerStats(300, 400, 1700000100.0)})]
    reads: list[int] = []

    def read() -> DeviceState:  # every get_sample_value is a scrape: the first sees readings[0], later ones [1]
        reads.append(1)
        return readings[min(len(reads), 2) - 1]

    window = TrafficWindow()
    registry = CollectorRegistry()
    registry.register(PeerCollector(read, lambda: {A: "node-a"}, window))
    labels = {"peer": "node-a", "public_key": A}
    assert registry.get_sample_value("warren_mesh_peer_receive_bytes_total", labels) == 100
    assert registry.get_sample_value("warren_mesh_peer_transmit_bytes_total", labels) == 400
    # A peer the device has but the topology does not name (being removed) is still reported, unnamed.
    unnamed = {"peer": "", "public_key": B}
    assert registry.get_sample_value("warren_mesh_peer_last_handshake_timestamp_seconds", unnamed) is not None


def test_a_device_that_cannot_be_read_is_reported_not_raised() -> None:
    def broken() -> DeviceState:
        raise OSError("no such device")

    registry = CollectorRegistry()
    registry.register(PeerCollector(broken, dict, TrafficWindow()))
    assert registry.get_sample_value("warren_mesh_device_up") == 0
    assert registry.get_sample_value("warren_mesh_peer_receive_bytes_total", {"peer": "", "public_key": A}) is None
