"""Agents on the memory backend against a real etcd: convergence, failure, restart, bad input, outages."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from helpers import AgentProcess, run
from integration.agents import Mesh, in_mesh
from warren_mesh.agent.app import Agent
from warren_mesh.identity.keys import NodeKey, load_or_create
from warren_mesh.settings import AgentSettings
from warren_mesh.testkit.etcd_server import EtcdServer, free_port
from warren_mesh.testkit.simulated import simulated_parts
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.records import MeshConfig, encode_json
from warren_mesh.values.device import PeerSpec
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.wireguard.backend import BackendError
from warren_mesh.wireguard.memory import MemoryBackend


def test_agents_converge_to_the_full_mesh(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    async def scenario(mesh: Mesh) -> None:
        for i in range(6):
            mesh.start(f"n{i}")
        await mesh.converged()
        addresses = {
            a.registrar.current.record.overlay_ip for a in mesh.agents.values() if a.registrar and a.registrar.current
        }
        assert len(addresses) == 6, "every node has its own overlay address"
        for name in mesh.agents:
            assert mesh.metric(name, "warren_mesh_peers") == 5
            assert mesh.metric(name, "warren_mesh_etcd_up") == 1
            assert mesh.agents[name].healthy()
        # Graceful stop revokes the lease: peers drop the node at once, not after the TTL.
        started = time.monotonic()
        await mesh.stop("n0")
        await mesh.converged()
        assert mesh.ttl is not None and time.monotonic() - started < mesh.ttl

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_a_killed_agent_leaves_every_peer_within_ttl_plus_one_second(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path, agent_process: Callable[..., AgentProcess]
) -> None:
    ttl = 3

    async def scenario(mesh: Mesh) -> None:
        for i in range(3):
            mesh.start(f"n{i}")
        victim = agent_process(shared_etcd, prefix, "victim", port=free_port(), ttl=ttl)
        victim.start()
        await mesh.converged({"n0", "n1", "n2", "victim"}, timeout=30)
        killed_at = time.monotonic()
        victim.kill()
        await wait_until(lambda: all("victim" not in mesh.peer_names(n) for n in mesh.agents), ttl + 3, "removal")
        gone_after = time.monotonic() - killed_at
        assert gone_after <= ttl + 1, f"victim lingered {gone_after:.2f} s (TTL {ttl} s)"
        await mesh.converged()

    in_mesh(shared_etcd, prefix, tmp_path, scenario, ttl=ttl)


def test_a_restarted_agent_keeps_key_and_address_and_does_not_flap_others(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path, agent_process: Callable[..., AgentProcess]
) -> None:
    async def scenario(mesh: Mesh) -> None:
        mesh.start("n0")
        mesh.start("n1")
        port = free_port()
        proc = agent_process(shared_etcd, prefix, "phoenix", port=port, ttl=5)
        proc.start()
        await mesh.converged({"n0", "n1", "phoenix"}, timeout=30)
        before = mesh.agents["n0"].view.nodes["phoenix"].record
        key = load_or_create(tmp_path / "phoenix.key")[0].public_key
        assert before.public_key == key
        ops_before = len(mesh.device("n0").operations)

        proc.kill()  # a crash: the old record stays on its lease for a while
        proc.start()
        old_lease = mesh.agents["n0"].view.nodes["phoenix"].lease

        def re_registered() -> bool:
            entry = mesh.agents["n0"].view.nodes.get("phoenix")
            return entry is not None and entry.lease != old_lease

        await wait_until(re_registered, 30, "the restarted agent's new registration")
        after = mesh.agents["n0"].view.nodes["phoenix"].record
        assert (after.public_key, after.overlay_ip) == (before.public_key, before.overlay_ip)
        await asyncio.sleep(6)  # longer than the old lease: its expiry must not remove the new record
        assert "phoenix" in mesh.peer_names("n0") and "phoenix" in mesh.peer_names("n1")
        flaps = [op for op in list(mesh.device("n0").operations)[ops_before:] if op.target == key]
        assert flaps == [], f"a restart with the same key and address changed nothing on peers, got {flaps}"
        assert proc.terminate() == 0

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_a_join_touches_only_the_new_peer(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    async def scenario(mesh: Mesh) -> None:
        for i in range(4):
            mesh.start(f"n{i}")
        await mesh.converged()
        marks = {n: len(mesh.device(n).operations) for n in mesh.agents}
        newcomer = mesh.start("new")
        await mesh.converged()
        registration = newcomer.registrar.current if newcomer.registrar else None
        assert registration is not None and len(registration.record.allowed_ips) == 1
        # Its pod subnet is inside the pod network, which every device routes whole: nothing but the peer changes.
        subnet = registration.record.allowed_ips[0]
        for name, mark in marks.items():
            agent = mesh.agents[name]
            assert agent.reconciler is not None
            assert str(agent.view.config.pod_networks[0].cidr) in mesh.device(name).routes and subnet.subnet_of(
                agent.view.config.pod_networks[0].cidr  # type: ignore[arg-type]
            ), name
            ops = list(mesh.device(name).operations)[mark:]
            assert [(op.action, op.target) for op in ops] == [("set_peer", newcomer.key.public_key)], name
        # Periodic resyncs with nothing to do change nothing.
        marks = {n: len(mesh.device(n).operations) for n in mesh.agents}
        for agent in mesh.agents.values():
            assert agent.reconciler is not None
            await agent.reconciler.reconcile_once()
        assert {n: len(mesh.device(n).operations) for n in mesh.agents} == marks

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_the_periodic_resync_repairs_a_drifted_device_while_the_mesh_keeps_changing(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    """The level-triggered pass runs every resync interval however busy the watch is (its timer used to restart
    with every pass, so a mesh that changed more often than the interval was never checked against the device)."""

    async def scenario(mesh: Mesh) -> None:
        watched = mesh.start("watched", resync_interval=1.0)
        mesh.start("other")
        await mesh.converged()
        other_key = mesh.agents["other"].key.public_key
        device = mesh.device("watched")
        device.remove_peer(device.peers[other_key])  # someone ran `wg set ... remove` by hand
        writer = shared_etcd.admin_store()
        busy_until = time.monotonic() + 8
        try:
            # Records no agent can take: every one is a watch event, a rejection and a pass, none a device change.
            i = 0
            while other_key not in device.peers and time.monotonic() < busy_until:
                await writer.put(KeySchema(mesh.prefix).node(f"bogus{i % 5}"), b"not json")
                i += 1
                await asyncio.sleep(0.2)
        finally:
            await writer.close()
        assert other_key in device.peers, "the resync never ran"
        assert watched.reconciler is not None and watched.reconciler.passes > 5

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def _node_doc(name: str, key: str, address: str, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema": 1,
        "name": name,
        "public_key": key,
        "endpoint": "192.0.2.30:30000",
        "overlay_ip": address,
        "allowed_ips": [],
        "listen_port": 51820,
        "published_at": time.time(),
    }
    doc.update(changes)
    return doc


def test_bad_records_are_rejected_alone(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    schema = KeySchema(prefix)

    async def scenario(mesh: Mesh) -> None:
        mesh.start("n0")
        mesh.start("n1")
        await mesh.converged()
        n1 = mesh.agents["n0"].view.nodes["n1"].record
        n1_revision = mesh.agents["n0"].view.nodes["n1"].mod_revision
        writer = shared_etcd.admin_store()
        key = NodeKey.generate().public_key
        bad = {
            "not-json": (b"{oops", "invalid_json"),
            "old-schema": (encode_json(_node_doc("old-schema", key, "10.96.50.1", schema=0)), "schema_version"),
            "short-key": (
                encode_json(_node_doc("short-key", base64.b64encode(b"x" * 31).decode(), "10.96.50.2")),
                "invalid_public_key",
            ),
            "bad-endpoint": (
                encode_json(_node_doc("bad-endpoint", key, "10.96.50.3", endpoint="nowhere")),
                "invalid_endpoint",
            ),
            "bad-cidr": (
                encode_json(_node_doc("bad-cidr", key, "10.96.50.4", allowed_ips=["10.1.0.0/99"])),
                "invalid_cidr",
            ),
            "thief": (encode_json(_node_doc("thief", key, str(n1.overlay_ip))), None),
        }
        for name, (raw, _) in bad.items():
            await writer.put(schema.node(name), raw)
        # n1's own record mangled in place: n1 stays (its last valid record is kept).
        await writer.put(schema.node("n1"), b"\x00garbage")
        await asyncio.sleep(0.5)
        await wait_until(
            lambda: mesh.metric("n0", "warren_mesh_rejected_records_total", {"reason": "invalid_json"}) == 2,
            5,
            "rejections",
        )
        for reason in ("schema_version", "invalid_public_key", "invalid_endpoint", "invalid_cidr"):
            assert mesh.metric("n0", "warren_mesh_rejected_records_total", {"reason": reason}) == 1, reason
        assert mesh.metric("n0", "warren_mesh_conflicts_total", {"reason": "address_taken"}) == 1
        assert mesh.peer_names("n0") == {"n1"}
        # n1 noticed its record was mangled and published it again.
        await wait_until(
            lambda: mesh.agents["n0"].view.nodes["n1"].mod_revision > n1_revision, 5, "n1 to restore its record"
        )
        # The agents kept running and still react to valid changes.
        mesh.start("n2")
        await mesh.converged()
        assert all(task_ok for task_ok in (a.healthy() for a in mesh.agents.values()))
        await writer.close()

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_etcd_outage_keeps_peers_and_catches_up(etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    schema = KeySchema(prefix)

    async def scenario(mesh: Mesh) -> None:
        for i in range(3):
            mesh.start(f"n{i}")
        await mesh.converged()
        await asyncio.to_thread(etcd.stop)
        await wait_until(lambda: mesh.metric("n0", "warren_mesh_etcd_up") == 0, 20, "etcd_up to drop")
        await asyncio.sleep(2)
        assert all(mesh.peer_names(n) == {"n0", "n1", "n2"} - {n} for n in mesh.agents), "peers kept while etcd away"
        await asyncio.to_thread(etcd.start)
        # A change made right after the outage reaches everyone.
        writer = etcd.admin_store()
        await writer.put(schema.config, encode_json(MeshConfig(mtu=1300).to_json()))
        await wait_until(
            lambda: all((d := mesh.device(n).interface) is not None and d.mtu == 1300 for n in mesh.agents),
            30,
            "the new MTU everywhere",
        )
        await wait_until(lambda: mesh.metric("n0", "warren_mesh_etcd_up") == 1, 20, "etcd_up to recover")
        await writer.close()
        await mesh.converged()

    in_mesh(etcd, prefix, tmp_path, scenario)


def test_a_lost_lease_is_re_registered(etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    async def scenario(mesh: Mesh) -> None:
        mesh.start("n0")
        mesh.start("n1")
        await mesh.converged()
        registrar = mesh.agents["n1"].registrar
        assert registrar is not None and registrar.current is not None
        # Someone (an operator, a compaction of leases after a long outage) revokes n1's lease.
        writer = etcd.admin_store()
        await writer.revoke_lease(registrar.current.lease_id)
        await wait_until(lambda: mesh.metric("n1", "warren_mesh_registrations_total") == 2, 10, "re-registration")
        await mesh.converged()
        await writer.close()

    in_mesh(etcd, prefix, tmp_path, scenario)


def test_a_lease_that_expires_while_registering_is_retried(etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """An agent stalled past its TTL between granting a lease and writing its record (seen with a thousand agents
    on two cores) gets "lease not found": it must register again, not stop."""

    async def scenario(mesh: Mesh) -> None:
        mesh.start("n0")
        mesh.start("n1")
        await mesh.converged()
        agent = mesh.agents["n1"]
        registrar = agent.registrar
        assert registrar is not None and registrar.current is not None
        store = agent.store
        grant = store.grant_lease
        stalled = 0

        async def grant_then_stall(ttl: int) -> int:
            nonlocal stalled
            lease = await grant(ttl)
            if stalled == 0:
                stalled += 1
                await store.revoke_lease(lease)  # what a stall longer than the TTL leaves behind
            return lease

        store.grant_lease = grant_then_stall  # type: ignore[method-assign]
        writer = etcd.admin_store()
        await writer.revoke_lease(registrar.current.lease_id)
        await wait_until(lambda: mesh.metric("n1", "warren_mesh_registrations_total") == 2, 15, "re-registration")
        # One lease was lost; the registration that failed after it is retried, not counted as another.
        assert stalled == 1 and mesh.metric("n1", "warren_mesh_lease_keepalive_failures_total") == 1
        await mesh.converged()
        await writer.close()

    in_mesh(etcd, prefix, tmp_path, scenario)


def test_metrics_and_health_endpoint(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    async def scenario(mesh: Mesh) -> None:
        port = free_port()
        mesh.start("n0", metrics_address=f"127.0.0.1:{port}")
        mesh.start("n1")
        await mesh.converged()
        await asyncio.sleep(0.2)

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()

        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200
        status, body = await asyncio.to_thread(get, "/metrics")
        for name in (
            "warren_mesh_peers 1.0",
            "warren_mesh_rejected_records_total",
            "warren_mesh_watch_events_total",
            "warren_mesh_reconcile_duration_seconds_bucket",
            "warren_mesh_etcd_up 1.0",
            "warren_mesh_convergence_lag_seconds_bucket",
            "warren_mesh_device_up 1.0",
        ):
            assert name in body, name
        # Per-peer series, read from the device at scrape time and labelled with the peer's node name.
        n1 = mesh.agents["n1"].key.public_key
        labels = f'peer="n1",public_key="{n1}"'
        assert f"warren_mesh_peer_receive_bytes_total{{{labels}}} 0.0" in body
        assert f"warren_mesh_peer_last_handshake_timestamp_seconds{{{labels}}} 0.0" in body
        assert 'warren_mesh_peer_info{allowed_ips="' in body and 'endpoint="192.0.2.1:' in body
        private = mesh.agents["n0"].key.private_base64()
        assert private not in body
        lint = await asyncio.to_thread(
            subprocess.run, ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, check=False
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_name_taken_by_another_key_is_a_clear_error(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    schema = KeySchema(prefix)

    async def occupy() -> None:
        writer = shared_etcd.admin_store()
        await writer.put(
            schema.node("taken"), encode_json(_node_doc("taken", NodeKey.generate().public_key, "10.96.9.9"))
        )
        await writer.close()

    run(occupy())
    key_file = tmp_path / "taken.key"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "agent",
            "--backend=memory",
            "--node-name=taken",
            *shared_etcd.client_flags(),
            f"--prefix={prefix}",
            "--endpoint=192.0.2.1:1",
            f"--key-file={key_file}",
            "--metrics-address=",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("warren-mesh: error: node name 'taken' is registered with another public key")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--etcd-endpoints=ftp://x", "--etcd-endpoints"),
        ("--endpoint=somewhere", "--endpoint"),
        ("--backend=magic", "--backend"),
        ("--lease-ttl=1", "--lease-ttl"),
        ("--node-name=Bad_Name", "--node-name"),
        ("--fwmark=0x1ffffffff", "--fwmark"),
    ],
)
def test_bad_flags_are_one_line_errors(flag: str, message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "warren_mesh.cli", "agent", f"--key-file={tmp_path / 'k'}", flag],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_status_command(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    async def scenario(mesh: Mesh) -> None:
        mesh.start("n0")
        mesh.start("n1")
        await mesh.converged()
        args = [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "status",
            *shared_etcd.client_flags(),
            f"--prefix={prefix}",
        ]
        out = await asyncio.to_thread(
            subprocess.run, [*args, "--output", "json"], capture_output=True, text=True, check=True
        )
        nodes = json.loads(out.stdout)
        assert [n["name"] for n in nodes] == ["n0", "n1"]
        assert {n["public_key"] for n in nodes} == {a.key.public_key for a in mesh.agents.values()}
        assert all(n["endpoint"].startswith("192.0.2.1:") and n["overlay_ip"].startswith("10.96.") for n in nodes)
        assert all(0 < n["lease_seconds_left"] <= 3 for n in nodes)
        table = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, check=True)
        assert table.stdout.splitlines()[0].split() == [
            "NODE",
            "OVERLAY",
            "IP",
            "ENDPOINT",
            "PUBLIC",
            "KEY",
            "LEASE",
            "LEFT",
        ]

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


class _RefusesPeersTogether(MemoryBackend):
    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        raise BackendError(f"refusing {len(specs)} peers at once")


def test_peers_are_set_one_by_one_when_the_device_refuses_them_together(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(mesh: Mesh) -> None:
        for i in range(3):
            mesh.start(f"n{i}")
        await mesh.converged()
        settings = AgentSettings.simulated(
            etcd_endpoint=shared_etcd.endpoint,
            prefix=prefix,
            name="picky",
            key_dir=tmp_path,
            port=29999,
            tls=shared_etcd.authorize_node("picky", prefix=prefix),
        )
        backend = _RefusesPeersTogether(interface_name="wgpicky")
        agent = Agent(settings, simulated_parts(settings, device=backend))
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            await wait_until(lambda: len(backend.peers) == 3, 15, "picky to have its three peers, one by one")
            assert [op.action for op in backend.operations].count("set_peer") == 3
            assert "setting 3 peers at once failed (refusing 3 peers at once); setting them one by one" in caplog.text
        finally:
            stop.set()
            await running

    in_mesh(shared_etcd, prefix, tmp_path, scenario)


def test_keys_rotate_when_the_meshs_interval_says_and_peers_follow(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    """keyRotationIntervalHours: a node whose key is older than the interval makes a new one; its peers move to it
    (docs/key-rotation.md); a node whose key is young does nothing."""
    schema = KeySchema(prefix)

    async def scenario(mesh: Mesh) -> None:
        admin = shared_etcd.admin_store()
        try:
            mesh.start("a")
            mesh.start("b")
            await mesh.converged()
            a, b = mesh.agents["a"], mesh.agents["b"]
            old, b_key = a.key.public_key, b.key.public_key
            two_hours_ago = time.time() - 7200
            os.utime(a.settings.device.key_file, (two_hours_ago, two_hours_ago))
            config = MeshConfig(key_rotation_interval_hours=1).to_json()
            await admin.put(schema.config, json.dumps(config).encode())
            await wait_until(
                lambda: (
                    a.key.public_key != old
                    and a.key.public_key in b.backend.read().peers
                    and old not in b.backend.read().peers
                ),
                30,
                "a to rotate its key and b to follow",
            )
            assert a.backend.read().public_key == a.key.public_key
            assert a.settings.device.key_file.read_text().strip() == a.key.private_base64()
            assert b.key.public_key == b_key  # b's key is young
        finally:
            await admin.close()

    in_mesh(shared_etcd, prefix, tmp_path, scenario)
