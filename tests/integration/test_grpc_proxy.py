"""Agents through etcd's gRPC proxy (`etcd grpc-proxy start`), what a cluster of thousands puts in front of etcd
(docs/benchmarks.md "etcd fan-out"): the mesh forms, a crashed node's lease still runs out, a graceful leave is
seen at once, and etcd itself holds the coalesced watchers, not one per agent."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import AgentProcess
from integration.agents import Mesh, in_mesh
from warren_mesh.testkit.etcd_proxy import EtcdGrpcProxy
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.exposition import scrape
from warren_mesh.testkit.waiting import wait_until

TTL = 3


def _etcd_watchers(etcd: EtcdServer) -> float:
    watchers = scrape(f"{etcd.endpoint}/metrics").get("etcd_debugging_mvcc_watcher_total")
    assert watchers is not None, "etcd reports no etcd_debugging_mvcc_watcher_total"
    return watchers


def test_agents_form_and_keep_the_mesh_through_an_etcd_grpc_proxy(
    etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    with EtcdGrpcProxy(etcd) as proxy:
        victim = AgentProcess(
            [
                "agent",
                "--backend=memory",
                f"--etcd-endpoints={proxy.endpoint}",
                f"--prefix={prefix}",
                "--node-name=victim",
                "--endpoint=192.0.2.1:29990",
                f"--key-file={tmp_path / 'victim.key'}",
                f"--lease-ttl={TTL}",
                "--metrics-address=",
            ],
            tmp_path / "victim.log",
        )

        async def scenario(mesh: Mesh) -> None:
            names = {f"n{i}" for i in range(6)}
            for name in sorted(names):
                mesh.start(name)
            victim.start()
            await mesh.converged({*names, "victim"}, timeout=30)
            # Seven agents each watch the mesh's prefix; etcd holds only the proxy's watchers, which it shares out
            # (3 here: agents that started at different revisions wait in groups of their own until caught up).
            watchers = _etcd_watchers(etcd)
            assert watchers < 7, f"etcd holds {watchers} watchers for 7 agents behind the proxy"

            # A crash: its lease, kept alive through the proxy, runs out at etcd, and the proxy's watchers see it.
            killed = time.monotonic()
            victim.kill()
            await wait_until(
                lambda: all("victim" not in mesh.peer_names(n) for n in names), TTL + 5, "the victim's removal"
            )
            assert time.monotonic() - killed <= TTL + 1, victim.log()

            # A graceful leave (lease revoked through the proxy) is seen at once.
            left = time.monotonic()
            await mesh.stop("n0")
            await mesh.converged(names - {"n0"})
            assert time.monotonic() - left < TTL
            # A join after all that.
            mesh.start("late")
            await mesh.converged(names - {"n0"} | {"late"})
            assert not mesh.ended()

        try:
            in_mesh(proxy.endpoint, prefix, tmp_path, scenario, ttl=TTL)
        finally:
            victim.kill()
