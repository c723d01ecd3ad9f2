"""What one node's own credential can do to the mesh (issue 28): a real etcd with TLS, client certificates and
the mesh's roles; the attacker holds node "evil"'s legitimate certificate (its per-node role, nothing more), and
honest agents each run on their own. Its own keys are all it may write, and with them it must not stop the mesh
from growing or healing."""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from helpers import run
from integration.agents import Mesh, in_mesh
from warren_mesh.mesh.usage import DEFAULT_QUOTA
from warren_mesh.store import roles
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.networks import usable_host_range
from warren_mesh.trust.records import MeshConfig, PodNetwork, encode_json
from warren_mesh.values.keyspace import KeySchema

TTL = 3  # the agents' lease
# Small networks, so that claiming all of them is quick: 62 overlay addresses, 16 pod subnets.
CONFIG = MeshConfig(
    overlay_cidrs=(ipaddress.ip_network("10.96.0.0/26"),),
    pod_networks=(PodNetwork(ipaddress.ip_network("10.244.0.0/20"), 24),),
)


def test_one_node_claiming_every_address_and_subnet_does_not_stop_the_next_from_joining(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    """Before, every valid claim counted as taken: the attacker wrote a claim for every free address and pod
    subnet under its own claims/evil/, the next node joined without pods and the one after could not join at all.
    Now only a node's oldest claim of each kind counts; the rest take nothing and every agent reports them."""
    schema = KeySchema(prefix)

    async def attack(mesh: Mesh, evil: EtcdStore) -> None:
        admin = shared_etcd.admin_store()
        await admin.put(schema.config, encode_json(CONFIG.to_json()))
        await admin.close()
        for name in ("n0", "n1"):
            mesh.start(name)
        await mesh.converged(timeout=30)

        first, last = usable_host_range(CONFIG.overlay_cidrs[0])
        addresses = [str(ipaddress.ip_address(i)) for i in range(first, last + 1)]
        subnets = [str(s) for s in CONFIG.pod_networks[0].cidr.subnets(new_prefix=CONFIG.pod_networks[0].node_prefix)]
        claims = [schema.claim("evil", a) for a in addresses] + [schema.claim("evil", s, "pods") for s in subnets]
        for key in claims:  # one by one: each its own revision, the first of each kind the oldest
            await evil.put(key, b"")
        surplus = len(addresses) - 1 + len(subnets) - 1
        await wait_until(
            lambda: all(
                mesh.metric(n, "warren_mesh_invalid_records", {"reason": "surplus_claim"}) == surplus
                for n in mesh.agents
            ),
            30,
            f"{surplus} surplus claims reported by every agent",
        )

        for name in ("n2", "n3"):
            mesh.start(name)
        await mesh.converged(timeout=30)
        for name in ("n2", "n3"):
            assert mesh.record(name).allowed_ips, f"{name} joined without pods"
            assert mesh.metric(name, "warren_mesh_pod_subnet_missing", {"family": "ipv4"}) == 0
        assert len({mesh.record(n).overlay_ip for n in mesh.agents}) == 4

    _as_node("evil", shared_etcd, prefix, tmp_path, attack)


def test_an_agent_removes_the_surplus_claims_someone_wrote_with_its_credential(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    """A stolen credential used beside the honest agent: the claims it adds under the agent's name take nothing,
    and the agent removes them (counted); its own address and subnet stay."""
    schema = KeySchema(prefix)

    async def use(mesh: Mesh, stolen: EtcdStore) -> None:
        mesh.start("n0")
        mesh.start("n1")
        await mesh.converged(timeout=30)
        before = (mesh.record("n0").overlay_ip, mesh.record("n0").allowed_ips)
        added = [schema.claim("n0", "10.96.200.1"), schema.claim("n0", "10.244.200.0/24", "pods")]
        for key in added:
            await stolen.put(key, b"")
        await wait_until(
            lambda: mesh.metric("n0", "warren_mesh_surplus_claims_removed_total") == len(added),
            30,
            "n0 removing the claims it did not make",
        )
        for key in added:
            await wait_until(lambda key=key: _absent(stolen, key), 10, f"{key} removed")
        assert (mesh.record("n0").overlay_ip, mesh.record("n0").allowed_ips) == before
        assert mesh.metric("n1", "warren_mesh_invalid_records", {"reason": "surplus_claim"}) == 0
        await mesh.converged()

    _as_node("n0", shared_etcd, prefix, tmp_path, use)


def test_a_hundred_mebibytes_under_one_nodes_keys_stop_no_node_from_registering(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    """Before, every listing was one answer: 100 values of 1 MiB under the attacker's own keys made it larger
    than the client takes (64 MiB), and no node could register or re-register (its lease ran out, every peer
    dropped it). Now listings are paged and bounded in bytes, and a value over an answer's bound is skipped by
    its key, never fetched: joins and restarts take about what they take without the attack."""
    schema = KeySchema(prefix)
    megabyte = b"x" * (1 << 20)

    async def attack(mesh: Mesh, evil: EtcdStore) -> None:
        for name in ("n0", "n1"):
            mesh.start(name)
        await mesh.converged(timeout=30)
        quiet_join = await _timed(mesh.converged, before=lambda: mesh.start("n2"))

        await evil.put(schema.node("evil"), megabyte)
        for i in range(99):
            await evil.put(schema.claim("evil", f"10.96.1.{i}"), megabyte)
        await wait_until(
            lambda: all(
                mesh.metric(n, "warren_mesh_invalid_records", {"reason": "too_large"}) == 100 for n in mesh.agents
            ),
            30,
            "every agent rejecting the 100 values of 1 MiB",
        )
        join = await _timed(mesh.converged, before=lambda: mesh.start("n3"))
        await mesh.stop("n0")
        await mesh.converged()
        restart = await _timed(mesh.converged, before=lambda: mesh.start("n0"))
        print(f"join without the attack {quiet_join:.2f} s; with 100 MiB: join {join:.2f} s, restart {restart:.2f} s")
        # Each listing now skips 100 keys one by one (two calls each): a fraction of a second, not a failure.
        assert join < quiet_join + 5 and restart < quiet_join + 5
        assert all(mesh.metric(n, "warren_mesh_invalid_records", {"reason": "too_large"}) == 100 for n in mesh.agents)

    try:
        _as_node("evil", shared_etcd, prefix, tmp_path, attack)
    finally:
        _delete_prefix(shared_etcd, prefix)


def test_a_node_past_its_hard_quota_loses_its_write_permissions_until_restored(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    """A node's role lets it write any number of keys under its claims: with one credential, etcd could be filled
    until it refuses every write of every node. Past the soft quota every agent reports the node; past the hard
    one the enroller's guard (on etcd's root credential) takes its write permissions away: its writes are refused
    from then on, it can still read, the honest mesh goes on, and only the administrator's restore gives them
    back."""
    schema = KeySchema(prefix)

    async def attack(mesh: Mesh, evil: EtcdStore) -> None:
        admin = shared_etcd.admin_store()
        # The guard as users without the enroller run it (the enroller runs the same QuotaGuard).
        guard = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "etcd-auth",
            "guard",
            *shared_etcd.client_flags(),
            f"--prefix={prefix}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert guard.stderr is not None
            async with asyncio.timeout(30):
                while b"quota guard: following" not in (line := await guard.stderr.readline()):
                    assert line, "the guard ended"
            for name in ("n0", "n1"):
                mesh.start(name)
            await mesh.converged(timeout=30)
            written = 0
            with pytest.raises(StoreError, match="permission denied"):
                for i in range(DEFAULT_QUOTA.hard_keys * 10):
                    await evil.put(schema.claim("evil", f"10.96.{i // 250}.{i % 250}"), b"")
                    written += 1
            print(f"evil wrote {written} keys before it was refused (hard quota {DEFAULT_QUOTA.hard_keys})")
            assert DEFAULT_QUOTA.hard_keys < written < DEFAULT_QUOTA.hard_keys * 2
            assert await roles.suspension(admin, schema, "evil") is not None
            with pytest.raises(StoreError, match="permission denied"):
                await evil.put(schema.node("evil"), b"{}")
            assert await evil.get(schema.claim("evil", "10.96.0.0")) is not None, "it still reads"
            await wait_until(
                lambda: _over_quota_everywhere(mesh, "evil", "hard", 1),
                10,
                "every agent reporting evil past its hard quota",
            )
            mesh.start("n2")
            await mesh.converged(timeout=30)

            # Adding the node again does not restore it; restoring does (clearing its keys first: restored while
            # still over its quota, it would be suspended again at once).
            refused = await _cli(shared_etcd, prefix, "etcd-auth", "add-node", "evil")
            assert refused[0] == 1 and "evil is suspended" in refused[1], refused
            restored = await _cli(shared_etcd, prefix, "etcd-auth", "restore", "evil", "--clear")
            assert restored[0] == 0 and "evil restored" in restored[1], restored
            await evil.put(schema.claim("evil", "10.96.0.9"), b"")
            await wait_until(
                lambda: _over_quota_everywhere(mesh, "evil", "hard", 0),
                10,
                "every agent seeing evil within its quota",
            )
            assert await roles.suspension(admin, schema, "evil") is None
        finally:
            if guard.returncode is None:
                guard.terminate()
            await guard.wait()
            await admin.close()

    _as_node("evil", shared_etcd, prefix, tmp_path, attack)


def test_a_suspended_node_keeps_its_place_and_its_lease(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """Suspension takes a node's writes, not its place in the mesh (README, Quotas): its agent keeps renewing its
    lease and reading, its peers keep it, and its data plane is untouched."""
    schema = KeySchema(prefix)

    async def scenario(mesh: Mesh) -> None:
        for name in ("n0", "n1"):
            mesh.start(name)
        await mesh.converged(timeout=30)
        admin = shared_etcd.admin_store()
        try:
            await roles.suspend_node(EtcdAuth(admin), schema, "n0", "a test")
            await asyncio.sleep(2 * TTL + 1)  # past its lease's TTL: renewals went through
            await mesh.converged()
            assert not mesh.ended(), mesh.ended()
            assert await admin.get(schema.node("n0")) is not None
        finally:
            await roles.restore_node(EtcdAuth(admin), schema, "n0")
            await admin.close()

    in_mesh(shared_etcd, prefix, tmp_path, scenario, ttl=TTL)


async def _cli(etcd: EtcdServer, prefix: str, *args: str) -> tuple[int, str]:
    """Run ``warren-mesh ARGS`` as etcd's root; its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warren_mesh.cli",
        *args,
        *etcd.client_flags(),
        f"--prefix={prefix}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return await process.wait(), out.decode()


def _over_quota_everywhere(mesh: Mesh, node: str, level: str, value: float) -> bool:
    return all(
        mesh.metric(n, "warren_mesh_node_over_quota", {"owner": node, "level": level}) == value for n in mesh.agents
    )


async def _timed(wait: Callable[[], Awaitable[None]], *, before: Callable[[], object]) -> float:
    started = time.monotonic()
    before()
    await wait()
    return time.monotonic() - started


def _delete_prefix(etcd: EtcdServer, prefix: str) -> None:
    async def delete() -> None:
        admin = etcd.admin_store()
        try:
            await admin.delete_prefix(prefix)
        finally:
            await admin.close()

    run(delete())


def _as_node(
    node: str,
    etcd: EtcdServer,
    prefix: str,
    key_dir: Path,
    act: Callable[[Mesh, EtcdStore], Awaitable[None]],
) -> None:
    """Run ``act`` with honest agents (``Mesh``) and a store on node ``node``'s own credential: the attacker's."""
    credential = etcd.authorize_node(node, prefix=prefix)

    async def scenario(mesh: Mesh) -> None:
        store = EtcdStore(etcd.endpoint, tls=credential)
        try:
            await act(mesh, store)
        finally:
            await store.close()

    in_mesh(etcd, prefix, key_dir, scenario)


async def _absent(store: EtcdStore, key: str) -> bool:
    return await store.get(key) is None
