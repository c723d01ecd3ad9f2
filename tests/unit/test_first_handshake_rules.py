"""Which peers agent/first_handshake.py starts over, on the memory device (tests/dataplane/test_first_handshake.py
crosses real wireguard-go handshakes): only peers that heard from the other end without a session, only from the
end with the greater key, once per peer added, and only once due."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.first_handshake import CHECK_AFTER, FirstHandshakes, crossed, starts_over
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.values.device import DeviceState, PeerSpec, PeerStats
from warren_mesh.wireguard.memory import MemoryBackend

HIGH, LOW = "z" * 43 + "=", "a" * 43 + "="


def _spec(key: str, endpoint: str | None = "192.0.2.2:51820") -> PeerSpec:
    return PeerSpec(key, endpoint, ("10.96.0.2/32",), 25)


def test_a_peer_that_heard_from_the_other_end_without_a_session_crossed() -> None:
    peers = {k: _spec(k) for k in ("crossed", "silent", "done", "nostats")} | {"dials_us": _spec("dials_us", None)}
    stats = {
        "crossed": PeerStats(receive_bytes=148, transmit_bytes=240),
        "silent": PeerStats(transmit_bytes=148),  # the other end has not added us (or is down): it will initiate
        "done": PeerStats(receive_bytes=92, transmit_bytes=148, last_handshake=1.0),
        "dials_us": PeerStats(receive_bytes=148),  # no endpoint: we cannot initiate anyway
    }
    device = DeviceState(public_key=HIGH, interface=None, peers=peers, stats=stats)
    assert [s.public_key for s in crossed(device, [*peers, "gone"])] == ["crossed"]


def test_only_the_end_with_the_greater_key_starts_over() -> None:
    assert starts_over(HIGH, LOW) and not starts_over(LOW, HIGH)


class _Device(MemoryBackend):
    """A memory device whose peers' counters the test sets."""

    def __init__(self) -> None:
        super().__init__("wgtest")
        self.stats: dict[str, PeerStats] = {}

    def read(self) -> DeviceState:
        state = super().read()
        return DeviceState(state.public_key, state.interface, state.peers, self.stats, state.routes)


def _watcher(device: _Device, own_key: str) -> tuple[FirstHandshakes, AgentMetrics]:
    metrics = AgentMetrics(CollectorRegistry())
    return FirstHandshakes(device, DeviceThread(inline=True), own_key=lambda: own_key, metrics=metrics), metrics


def test_a_crossed_peer_is_added_again_as_it_was_once_due_and_only_once() -> None:
    device = _Device()
    spec = _spec(LOW)
    device.set_peer(spec)
    device.stats[LOW] = PeerStats(receive_bytes=148, transmit_bytes=240)
    watcher, metrics = _watcher(device, HIGH)

    async def scenario() -> None:
        watcher.added([LOW], now=100.0)
        await watcher.judge(100.0 + CHECK_AFTER / 2)
        assert [op.action for op in device.operations] == ["set_peer"], "judged before it was due"
        await watcher.judge(100.0 + CHECK_AFTER)
        await watcher.judge(200.0)  # judged once: WireGuard's own retries do the rest

    asyncio.run(scenario())
    assert [op.action for op in device.operations] == ["set_peer", "remove_peer", "set_peer"]
    assert device.peers == {LOW: spec}, "added again exactly as it was"
    assert metrics.registry.get_sample_value("warren_mesh_handshakes_started_over_total") == 1


def test_the_end_with_the_smaller_key_leaves_a_crossed_peer_to_the_other() -> None:
    device = _Device()
    device.set_peer(_spec(HIGH))
    device.stats[HIGH] = PeerStats(receive_bytes=148, transmit_bytes=240)
    watcher, metrics = _watcher(device, LOW)

    async def scenario() -> None:
        watcher.added([HIGH], now=100.0)
        await watcher.judge(200.0)

    asyncio.run(scenario())
    assert [op.action for op in device.operations] == ["set_peer"]
    assert metrics.registry.get_sample_value("warren_mesh_handshakes_started_over_total") == 0
