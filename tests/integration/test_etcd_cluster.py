"""Agents against a real 3-member etcd cluster: the leader dies, then the quorum is lost for 30 s, then restored.

An outage of any kind is ridden out the same way: the device keeps what it has, nothing exits, and the mesh
catches up once etcd answers again. (Before, losing the quorum ended every agent within ~6 s: the lease keepalive
failed over and closed the gRPC channel the watch shared, and the watch took gRPC's cancellation for a request
to stop.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.agents import Mesh, in_mesh
from warren_mesh.testkit.etcd_server import EtcdCluster
from warren_mesh.testkit.waiting import wait_until

QUORUM_LOSS = 30.0  # seconds, as the issue that found the crash measured it


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(3) as running:
        yield running


def _rotated(cluster: EtcdCluster, i: int) -> str:
    """Every member's URL, starting at a different one per agent, so agents spread over the members."""
    urls = [m.endpoint for m in cluster.members]
    return ",".join(urls[i % 3 :] + urls[: i % 3])


def test_agents_ride_out_leader_loss_and_quorum_loss(
    cluster: EtcdCluster, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The agents' INFO lines too, should it fail: which member each watch resumed on, and from which revision.
    caplog.set_level(logging.INFO, logger="warren_mesh")

    async def scenario(mesh: Mesh) -> None:
        for i in range(4):
            mesh.start(f"n{i}", etcd_endpoint=_rotated(cluster, i))
        await mesh.converged(timeout=30)

        # The leader dies: a node that joins meanwhile is seen by everyone, and nobody's peers flap.
        leader = cluster.leader()
        operations = {n: len(mesh.device(n).operations) for n in mesh.agents}
        await asyncio.to_thread(leader.kill)
        started = time.monotonic()
        mesh.start("joiner", etcd_endpoint=_rotated(cluster, 1))
        await mesh.converged(timeout=30)
        print(f"leader {leader.name} killed: the join was seen everywhere in {time.monotonic() - started:.1f} s")
        for name, before in operations.items():
            changes = [op for op in list(mesh.device(name).operations)[before:] if op.action == "remove_peer"]
            assert not changes, f"{name} removed peers while the leader changed: {changes}"

        # A second member dies: no quorum. For 30 s nothing may change on any device and no agent may end.
        second = next(m for m in cluster.members if m.pid is not None)
        peers = {n: dict(mesh.device(n).peers) for n in mesh.agents}
        await asyncio.to_thread(second.kill)
        lost = time.monotonic()
        while time.monotonic() - lost < QUORUM_LOSS:
            await asyncio.sleep(1)
            assert not mesh.ended(), f"agents ended during the quorum loss: {mesh.ended()}"
            for name, held in peers.items():
                assert mesh.device(name).peers == held, f"{name}'s device changed while etcd had no quorum"
            assert all(agent.healthy() for agent in mesh.agents.values())
        # Every agent says etcd is away: without a quorum nothing can be written or renewed (the one member left
        # still serves watches, which must not make it look healthy).
        down = {n: mesh.metric(n, "warren_mesh_etcd_up") for n in mesh.agents}
        assert set(down.values()) == {0.0}, f"warren_mesh_etcd_up during the quorum loss: {down}"

        # Quorum back: everyone catches up, and a node that joins now reaches every device.
        for member in (leader, second):
            await asyncio.to_thread(member.start, wait=False)
        for member in (leader, second):
            await asyncio.to_thread(member.wait_healthy, 30)
        restored = time.monotonic()
        mesh.start("after", etcd_endpoint=_rotated(cluster, 2))
        await mesh.converged(timeout=60)
        print(f"quorum restored: a new node was seen everywhere in {time.monotonic() - restored:.1f} s")
        await wait_until(
            lambda: all(mesh.metric(n, "warren_mesh_etcd_up") == 1 for n in mesh.agents), 30, "etcd_up everywhere"
        )
        assert not mesh.ended()

    # The product's default lease of 10 s. With 3 s the test failed once in about ten runs, under the full suite
    # only (the failure itself was not captured); a keepalive that must fail over to another member while the
    # machine is loaded is the likely cause, and 3 s is no lease a cluster would run with.
    in_mesh(cluster.members[0].endpoint, prefix, tmp_path, scenario, ttl=10)
