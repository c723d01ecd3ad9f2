"""A running agent moves to a renewed etcd client certificate without a restart: it keeps its connection to etcd
for months, so an expired certificate would only show when it reconnects, and then it could not."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from pathlib import Path

from helpers import run
from warren_mesh.agent.app import Agent
from warren_mesh.identity import pki
from warren_mesh.settings import AgentSettings
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.simulated import simulated_parts
from warren_mesh.testkit.waiting import wait_until

VALID_FOR = 12.0  # seconds left on the certificates the agents start with


def _agent(etcd: EtcdServer, name: str, prefix: str, key_dir: Path, *, reload_interval: float) -> Agent:
    settings = AgentSettings.simulated(
        etcd_endpoint=etcd.endpoint,
        prefix=prefix,
        name=name,
        key_dir=key_dir,
        port=20000 + len(name),
        tls=etcd.authorize_node(name, prefix=prefix),
    )
    settings = dataclasses.replace(
        settings, store=dataclasses.replace(settings.store, tls_reload_interval=reload_interval)
    )
    return Agent(settings, simulated_parts(settings))


def _sample(agent: Agent, metric: str) -> float:
    value = agent.metrics.registry.get_sample_value(metric)
    return -1.0 if value is None else value


EXPIRY = "warren_mesh_etcd_client_certificate_expiry_timestamp_seconds"


def test_a_renewed_certificate_is_used_before_the_old_one_expires(tmp_path: Path, prefix: str) -> None:
    directory = tmp_path / "pki"
    pki.init(directory, ["127.0.0.1"])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1) + datetime.timedelta(seconds=VALID_FOR)
    for name in ("renews", "stale"):  # certificates that expire VALID_FOR seconds from now
        pki.issue(directory, pki.node_user(name), pki.node_user(name), days=1, not_before=start)
    expiry = time.time() + VALID_FOR
    with EtcdServer(pki=directory) as etcd:
        etcd.enable_auth(prefix=prefix)

        async def scenario() -> None:
            # "stale" looks for renewed files only every hour: the control that shows what the test would catch.
            renews = _agent(etcd, "renews", prefix, tmp_path, reload_interval=0.2)
            stale = _agent(etcd, "stale", prefix, tmp_path, reload_interval=3600)
            stops = {a: asyncio.Event() for a in (renews, stale)}
            runs = [asyncio.create_task(a.run(stops[a])) for a in (renews, stale)]
            try:
                await wait_until(lambda: renews.healthy() and stale.healthy(), 10, "both agents to start")
                await wait_until(lambda: _sample(renews, EXPIRY) > 0, 5, "the certificate's expiry metric")
                assert abs(_sample(renews, EXPIRY) - expiry) < 5
                for name in ("renews", "stale"):  # what `warren-mesh enroll --watch` does on the node
                    pki.issue_node(directory, name)
                await wait_until(
                    lambda: _sample(renews, EXPIRY) > time.time() + 3600,
                    5,
                    "the agent to load the renewed certificate",
                )
                await asyncio.sleep(max(0.0, expiry - time.time()) + 1)  # the first certificates have expired
                await asyncio.to_thread(etcd.restart)  # every client must connect (and show a certificate) again
                await wait_until(lambda: _sample(renews, "warren_mesh_etcd_up") == 1, 15, "renews back on etcd")
                registration = renews.registrar.current if renews.registrar else None
                assert registration is not None
                lease = registration.lease_id
                left_before = await renews.store.lease_time_left(lease)
                await asyncio.sleep(2)
                assert await renews.store.lease_time_left(lease) > 0 and left_before > 0  # still held
                # The control: its expired certificate is refused, and nothing it does reaches etcd.
                assert _sample(stale, "warren_mesh_etcd_up") == 0
                assert all(not t.done() for t in runs), "an agent ended"
            finally:
                for agent in (renews, stale):
                    stops[agent].set()
                await asyncio.gather(*runs, return_exceptions=True)

        run(scenario())
