"""What etcd's own auth protects, and what it does not, on the etcd this project runs (3.4): the facts per-node
roles will be built on (docs/security.md). Users are the common names of the client certificates.

With a role that may write only its own key, a node cannot write or delete another node's key, nor revoke its
lease. But it can keep another node's lease alive (etcd#14663: LeaseKeepAlive is not checked against the keys on
the lease). If a newer etcd checks it, this test fails, and the mitigation in docs/security.md can be revisited.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import run
from warren_mesh import pki
from warren_mesh.etcd_tls import EtcdTls
from warren_mesh.lab.etcd_server import EtcdServer
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore

PREFIX = "/auth"


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, Path]]:
    directory = tmp_path_factory.mktemp("pki")
    pki.init(directory, ["127.0.0.1"])
    for node in ("a", "b"):
        pki.issue_node(directory, node)
    with EtcdServer(pki=directory) as etcd:
        admin = [
            "etcdctl",
            f"--endpoints={etcd.endpoint}",
            f"--cacert={directory / 'ca.pem'}",
            f"--cert={directory / 'admin.pem'}",
            f"--key={directory / 'admin-key.pem'}",
        ]
        commands = [["user", "add", "root", "--no-password"], ["role", "add", "root"]]
        commands.append(["user", "grant-role", "root", "root"])
        for node in ("a", "b"):
            user = pki.node_user(node)
            commands += [["user", "add", user, "--no-password"], ["role", "add", user]]
            commands.append(["role", "grant-permission", user, "readwrite", f"{PREFIX}/v1/nodes/{node}"])
            commands.append(["role", "grant-permission", user, "read", f"{PREFIX}/", "--prefix=true"])
            commands.append(["user", "grant-role", user, user])
        commands.append(["auth", "enable"])
        for command in commands:
            subprocess.run([*admin, *command], check=True, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"})
        yield etcd, directory


def _store(etcd: EtcdServer, directory: Path, node: str) -> EtcdStore:
    user = pki.node_user(node)
    tls = EtcdTls(directory / "ca.pem", directory / f"{user}.pem", directory / f"{user}-key.pem")
    return EtcdStore(etcd.endpoint, tls=tls)


def test_a_node_role_cannot_touch_another_nodes_key_but_can_keep_its_lease_alive(
    auth_etcd: tuple[EtcdServer, Path],
) -> None:
    etcd, directory = auth_etcd

    async def scenario() -> None:
        a, b = _store(etcd, directory, "a"), _store(etcd, directory, "b")
        try:
            lease = await a.grant_lease(5)
            await a.put(f"{PREFIX}/v1/nodes/a", b"a's record", lease=lease)
            for attempt in (
                b.put(f"{PREFIX}/v1/nodes/a", b"b's takeover"),
                b.delete(f"{PREFIX}/v1/nodes/a"),
                b.revoke_lease(lease),
                b.put(f"{PREFIX}/v1/config", b"{}"),
            ):
                with pytest.raises(StoreError, match="PERMISSION_DENIED"):
                    await attempt
            # Only b refreshes a's lease, for longer than its TTL: it stays (etcd#14663).
            holding = asyncio.create_task(b.hold_lease(lease, 5, first_in=0.0))
            await asyncio.sleep(8)
            assert not holding.done(), holding.exception() if holding.done() else None
            assert await a.lease_time_left(lease) > 0
            kept = await a.get(f"{PREFIX}/v1/nodes/a")
            assert kept is not None and kept.value == b"a's record"
            holding.cancel()
            await a.revoke_lease(lease)
        finally:
            await a.close()
            await b.close()

    run(scenario())
