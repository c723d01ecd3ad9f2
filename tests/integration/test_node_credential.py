"""What one node's own credential can do to the mesh (issue 28): a real etcd with TLS, client certificates and
the mesh's roles; the attacker holds node "evil"'s legitimate certificate (its per-node role, nothing more), and
honest agents each run on their own. Its own keys are all it may write, and with them it must not stop the mesh
from growing or healing."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

from integration.agents import Mesh, in_mesh
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.networks import usable_host_range
from warren_mesh.trust.records import MeshConfig, encode_json
from warren_mesh.values.keyspace import KeySchema

# Small networks, so that claiming all of them is quick: 62 overlay addresses, 16 pod subnets.
CONFIG = MeshConfig(overlay_cidr=ipaddress.ip_network("10.96.0.0/26"), pod_cidr=ipaddress.ip_network("10.244.0.0/20"))


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

        first, last = usable_host_range(CONFIG.overlay_cidr)
        addresses = [str(ipaddress.ip_address(i)) for i in range(first, last + 1)]
        subnets = [str(s) for s in CONFIG.pod_cidr.subnets(new_prefix=CONFIG.node_subnet_prefix)]
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
            assert mesh.metric(name, "warren_mesh_pod_subnet_missing") == 0
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
