"""A mesh of the shared-reservation schema (``ipam/<address>``, writable by any node) moved to node-owned claims
without any node losing its address: new agents honour and adopt the old reservations, and `warren-mesh
migrate-claims` moves the rest (docs/etcd-keys.md, "Migrating from ipam/")."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from integration.agents import Mesh, in_mesh
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.values.keyspace import KeySchema


def _migrate(etcd: EtcdServer, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "migrate-claims",
            *etcd.client_flags(),
            f"--prefix={prefix}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_old_mesh_is_migrated_without_losing_any_nodes_address(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    schema = KeySchema(prefix)

    async def scenario(mesh: Mesh) -> None:
        admin = shared_etcd.admin_store()
        try:
            # The old mesh: a, b and a node gone for good hold addresses; c (a new agent) raced b for its address
            # and lost (its claim is younger than b's reservation); one reservation is garbage.
            for address, owner in (("10.96.0.5", b"a"), ("10.96.0.6", b"b"), ("10.96.0.7", b"gone")):
                await admin.put(schema.legacy_reservation(address), owner)
            await admin.put(schema.claim("c", "10.96.0.6"), b"")
            await admin.put(schema.legacy_reservation("10.96.0.8"), b"Not A Name")

            # A new agent keeps its old address and claims it under its own key.
            mesh.start("a")
            await wait_until(lambda: "a" in mesh.agents["a"].view.nodes, 10, "a to register")
            assert str(mesh.agents["a"].view.nodes["a"].record.overlay_ip) == "10.96.0.5"
            assert await admin.get(schema.claim("a", "10.96.0.5")) is not None

            done = await asyncio.to_thread(_migrate, shared_etcd, prefix)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines() == [
                "moved 10.96.0.5 -> a",
                "moved 10.96.0.6 -> b",
                "moved 10.96.0.7 -> gone",
                f"left invalid reservation {schema.legacy_reservation('10.96.0.8')} (delete it by hand)",
            ]
            left = await admin.list_prefix(schema.ipam)
            assert [kv.key for kv in left.items] == [schema.legacy_reservation("10.96.0.8")]
            claims = await admin.list_prefix(schema.claims)
            assert sorted(kv.key for kv in claims.items if "/overlay/" in kv.key) == sorted(
                [schema.claim("a", "10.96.0.5"), schema.claim("b", "10.96.0.6"), schema.claim("gone", "10.96.0.7")]
            ), "c's losing claim must go: it would be older than b's new one"
            again = await asyncio.to_thread(_migrate, shared_etcd, prefix)
            assert again.stdout.splitlines()[-1].startswith("left invalid reservation")

            # b and c come back: b at its address, c elsewhere; a kept its place throughout.
            mesh.start("b")
            mesh.start("c")
            await mesh.converged()
            addresses = {n: str(e.record.overlay_ip) for n, e in mesh.agents["a"].view.nodes.items()}
            assert addresses["a"] == "10.96.0.5" and addresses["b"] == "10.96.0.6"
            assert addresses["c"] not in {"10.96.0.5", "10.96.0.6", "10.96.0.7"}
        finally:
            await admin.close()

    in_mesh(shared_etcd, prefix, tmp_path, scenario)
