"""Two wireguard-go devices that add each other at once, over a path 200 ms long each way (delay_relay.py): their
first handshakes cross, and WireGuard alone waits for its retry (5 s, and crossing again); with
agent/first_handshake.py on both ends, one end starts over and the pair has a session at once."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.first_handshake import FirstHandshakes, starts_over
from warren_mesh.identity.keys import NodeKey
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.process import in_netns
from warren_mesh.values.device import InterfaceSpec, PeerSpec
from warren_mesh.wireguard.userspace import UserspaceBackend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

DELAY = 0.2  # seconds each way: longer than WireGuard's retry jitter (1/3 s at most), so its retries cross too
REKEY_TIMEOUT = 5.0  # WireGuard's wait before it initiates again
RELAY_HOST, RELAY_PORTS = "192.168.251.1", (6000, 6001)  # device 0 dials device 1 at the first, 1 dials 0 at the other


@pytest.fixture
def slow_path(pair: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """The pair's namespaces, with a relay that delays everything between the devices' ports."""
    relay = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("delay_relay.py")),
            str(DELAY),
            RELAY_HOST,
            str(RELAY_PORTS[0]),
            "192.168.251.2:51820",
            str(RELAY_PORTS[1]),
            "192.168.251.1:51820",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=in_netns(pair[0]),  # noqa: PLW1509 (one setns call)
    )
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        yield pair
    finally:
        relay.kill()
        relay.wait()


def _keys() -> list[NodeKey]:
    """Two keys, the greater public key first."""
    return sorted((NodeKey.generate(), NodeKey.generate()), key=lambda k: k.public_key, reverse=True)


def _device(namespaces: tuple[str, str], i: int, key: NodeKey) -> UserspaceBackend:
    backend = UserspaceBackend(f"{namespaces[0][:-1]}w{i}", netns=namespaces[i])
    try:
        backend.set_private_key(key)
        backend.configure_interface(InterfaceSpec((f"10.99.0.{i + 1}/24",), 51820, 1420))
    except BaseException:
        backend.close(remove_device=True)
        raise
    return backend


def _peer(i: int, keys: list[NodeKey]) -> PeerSpec:
    """Device ``i``'s peer: the other, dialled through the relay, with a persistent keepalive (it initiates at
    once)."""
    return PeerSpec(keys[1 - i].public_key, f"{RELAY_HOST}:{RELAY_PORTS[i]}", (f"10.99.0.{2 - i}/32",), 25)


def _session(backend: UserspaceBackend, peer: str) -> bool:
    stats = backend.read().stats.get(peer)
    return stats is not None and stats.last_handshake != 0.0


def test_first_handshakes_of_a_pair_added_at_once_cross_and_wireguard_waits_its_retry(
    slow_path: tuple[str, str],
) -> None:
    """What agent/first_handshake.py is for, as wireguard-go does it: no session before its retry is due."""
    keys = _keys()
    backends: list[UserspaceBackend] = []
    try:
        for i in (0, 1):
            backends.append(_device(slow_path, i, keys[i]))
        for i, backend in enumerate(backends):  # one right after the other
            backend.set_peer(_peer(i, keys))
        started = time.monotonic()
        while time.monotonic() - started < REKEY_TIMEOUT - 0.5:
            sessions = [_session(backend, keys[1 - i].public_key) for i, backend in enumerate(backends)]
            assert not any(sessions), f"a session after {time.monotonic() - started:.1f} s: no crossing"
            time.sleep(0.05)
        # Each end heard the other (its initiation and its answer) and still has no session.
        assert all(backend.read().stats[keys[1 - i].public_key].receive_bytes > 0 for i, backend in enumerate(backends))
    finally:
        for backend in backends:
            backend.close(remove_device=True)


def test_one_end_of_a_pair_whose_first_handshakes_crossed_starts_over_and_the_pair_has_a_session_at_once(
    slow_path: tuple[str, str],
) -> None:
    """Each device driven as the agent drives it: on a device thread of its own, its first handshakes watched."""
    keys = _keys()
    metrics = [AgentMetrics(CollectorRegistry()) for _ in keys]
    threads = [DeviceThread(), DeviceThread()]

    async def scenario() -> float | None:
        backends: list[UserspaceBackend] = []
        tasks = []
        try:
            for i, thread in enumerate(threads):
                backends.append(await thread.run(functools.partial(_device, slow_path, i, keys[i])))
            watchers = [
                FirstHandshakes(backend, thread, own_key=functools.partial(lambda k: k.public_key, key), metrics=m)
                for backend, thread, key, m in zip(backends, threads, keys, metrics, strict=True)
            ]
            tasks = [asyncio.create_task(watcher.run()) for watcher in watchers]
            for i, (backend, thread, watcher) in enumerate(zip(backends, threads, watchers, strict=True)):
                await thread.run(functools.partial(backend.set_peer, _peer(i, keys)))
                watcher.added([keys[1 - i].public_key])
            started = time.monotonic()
            while time.monotonic() - started < REKEY_TIMEOUT - 0.5:
                sessions = [
                    await thread.run(functools.partial(_session, backend, keys[1 - i].public_key))
                    for i, (backend, thread) in enumerate(zip(backends, threads, strict=True))
                ]
                if all(sessions):
                    return time.monotonic() - started
                await asyncio.sleep(0.05)
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for backend, thread in zip(backends, threads, strict=False):
                await thread.run(functools.partial(backend.close, remove_device=True))

    try:
        waited = asyncio.run(scenario())
    finally:
        for thread in threads:
            thread.shutdown()
    started_over = [m.registry.get_sample_value("warren_mesh_handshakes_started_over_total") for m in metrics]
    print(f"a pair added at once over {DELAY * 1000:.0f} ms each way: a session after {waited} s, {started_over}")
    assert waited is not None, "no session before WireGuard's own retry"
    # Only the end with the greater key started over (both at once would cross again); the other answered.
    assert starts_over(keys[0].public_key, keys[1].public_key)
    assert started_over == [1.0, 0.0]
