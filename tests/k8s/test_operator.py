"""The operator against a real kube-apiserver (v1.20, built from Debian's source) and a real etcd, with agents on
the memory device: what a user does with kubectl reaches every agent, and the mesh shows up in kubectl."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import AgentProcess
from k8s_cluster import KUBECTL, ROOT, Cluster, OperatorProcess, readme_secret_commands
from warren_mesh.agent.app import Agent
from warren_mesh.controller.mesh_sync import LOCATION_REFRESH, PASS_INTERVAL, SURPLUS_GRACE
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.usage import DEFAULT_QUOTA
from warren_mesh.settings import AgentSettings
from warren_mesh.testkit.etcd_server import EtcdServer, free_port
from warren_mesh.testkit.simulated import simulated_parts
from warren_mesh.testkit.waiting import wait_for
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.wireguard.memory import MemoryBackend

PREFIX = "/warren/mesh"
SCHEMA = KeySchema(PREFIX)
PEER_KEY = NodeKey.generate().public_key

MESH = """
apiVersion: mesh.warren.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  overlayCIDR: 10.96.0.0/16
  mtu: 1400
  leaseTTLSeconds: 3
  keyRotationIntervalHours: 720
"""

PEER = f"""
apiVersion: mesh.warren.io/v1alpha1
kind: MeshPeer
metadata:
  name: laptop
spec:
  publicKey: "{PEER_KEY}"
  endpoint: 192.0.2.7:51820
  allowedIPs: ["10.96.250.1/32", "192.168.77.0/24"]
"""


class Agents:
    """Agents on memory devices, each running on one event loop in a thread of its own, so the test can read
    their devices (plain attributes) while they run."""

    def __init__(self, etcd: EtcdServer, key_dir: Path) -> None:
        self.etcd = etcd
        self.key_dir = key_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.backends: dict[str, MemoryBackend] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._runs: list[Any] = []

    def start(self, name: str) -> None:
        settings = AgentSettings.simulated(
            etcd_endpoint=self.etcd.endpoint,
            prefix=PREFIX,
            name=name,
            key_dir=self.key_dir,
            port=free_port(),
            tls=self.etcd.authorize_node(name, prefix=PREFIX),
        )
        backend = MemoryBackend(interface_name="wg-" + name)
        self.backends[name] = backend

        async def run() -> None:
            stop = asyncio.Event()
            self._stops[name] = stop
            await Agent(settings, simulated_parts(settings, device=backend)).run(stop)

        self._runs.append(asyncio.run_coroutine_threadsafe(run(), self.loop))

    def close(self) -> None:
        for stop in self._stops.values():
            self.loop.call_soon_threadsafe(stop.set)
        for future in self._runs:
            future.result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def mtus(self) -> set[int | None]:
        return {b.interface.mtu if b.interface else None for b in self.backends.values()}


@pytest.fixture
def agents(mesh_etcd: EtcdServer, tmp_path: Path) -> Iterator[Agents]:
    made = Agents(mesh_etcd, tmp_path)
    try:
        yield made
    finally:
        made.close()


def etcd_keys(etcd: EtcdServer, prefix: str) -> list[str]:
    async def read() -> list[str]:
        store = etcd.admin_store()
        try:
            return [kv.key for kv in (await store.list_prefix(prefix)).items]
        finally:
            await store.close()

    return asyncio.run(read())


def etcd_value(etcd: EtcdServer, key: str) -> bytes | None:
    """``key``'s value, read as the admin."""

    async def read() -> bytes | None:
        store = etcd.admin_store()
        try:
            kv = await store.get(key)
            return None if kv is None else kv.value
        finally:
            await store.close()

    return asyncio.run(read())


def condition(obj: dict[str, Any] | None) -> dict[str, Any]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or [{}]
    return dict(conditions[0])


def test_manifests_pass_server_side_validation(cluster: Cluster) -> None:
    for target in ("deploy", "deploy/external-etcd"):
        out = cluster.kubectl("apply", "-k", str(ROOT / target), "--dry-run=server")
        for kind in ("deployment.apps/warren-mesh-operator", "daemonset.apps/warren-mesh-agent", "clusterrole"):
            assert kind in out, out
    assert "statefulset.apps/warren-mesh-etcd" in cluster.kubectl(
        "apply", "-k", str(ROOT / "deploy"), "--dry-run=server"
    )
    assert "statefulset" not in cluster.kubectl("apply", "-k", str(ROOT / "deploy/external-etcd"), "--dry-run=server")


def test_the_documented_certificates_and_secrets_are_what_the_manifests_mount(cluster: Cluster, tmp_path: Path) -> None:
    """deploy/README.md's commands, run as written (in a scratch directory, against the test API server): each
    Secret the manifests mount exists with the files they name, and no Secret holds a key it does not need."""
    made = ["configmap/warren-mesh-ca"]
    try:
        for program, *args in readme_secret_commands():
            if program == "warren-mesh":
                subprocess.run([sys.executable, "-m", "warren_mesh.cli", *args], cwd=tmp_path, check=True)
                continue
            result = subprocess.run(
                [KUBECTL, f"--kubeconfig={cluster.kubeconfig}", *args],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0 or "AlreadyExists" in result.stderr, result.stderr
            if "secret" in args:
                made.append(f"secret/{args[args.index('generic') + 1]}")
        secrets = {
            name.split("/")[1]: set(json.loads(cluster.kubectl("get", name, "-n", "warren-mesh", "-o", "json"))["data"])
            for name in made
        }
        assert secrets["warren-mesh-ca"] == {"ca.pem"}
        assert secrets["warren-mesh-etcd-tls"] == {"ca.pem", "etcd.pem", "etcd-key.pem"}
        assert secrets["warren-mesh-operator-etcd"] == {"ca.pem", "operator.pem", "operator-key.pem"}
        enroller = secrets["warren-mesh-enroller"]
        assert enroller == {"ca.pem", "ca-key.pem", "admin.pem", "admin-key.pem", "enroller.pem", "enroller-key.pem"}
        manifests = "".join(
            (ROOT / "deploy" / "base" / f).read_text()
            for f in ("etcd.yaml", "operator.yaml", "enroller.yaml", "agent.yaml")
        )
        for name in secrets:
            assert name in manifests, f"{name} is made but mounted nowhere"
        for path in (
            "/etc/etcd/tls/etcd.pem",
            "/etc/warren-mesh/etcd/operator.pem",
            "/etc/warren-mesh/pki/enroller.pem",
        ):
            assert path in manifests
    finally:
        for name in made:
            cluster.kubectl("delete", name, "-n", "warren-mesh", "--ignore-not-found", check=False)


def test_service_accounts_can_do_what_they_need_and_no_more(cluster: Cluster) -> None:
    def can(who: str, *what: str) -> bool:
        answer = cluster.kubectl("auth", "can-i", *what, f"--as=system:serviceaccount:warren-mesh:{who}", check=False)
        return answer.strip().splitlines()[0] == "yes"

    needed = [
        ("watch", "meshes.mesh.warren.io"),
        ("patch", "meshes.mesh.warren.io", "--subresource=status"),
        ("patch", "meshpeers.mesh.warren.io"),
        ("create", "meshnodes.mesh.warren.io"),
        ("delete", "meshnodes.mesh.warren.io"),
        ("patch", "meshnodes.mesh.warren.io", "--subresource=status"),
        ("watch", "nodes"),
        ("create", "events", "-n", "default"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    for what in needed:
        assert can("warren-mesh-operator", *what), what
    for what in [
        ("create", "meshes.mesh.warren.io"),
        ("delete", "meshes.mesh.warren.io"),
        ("update", "meshpeers.mesh.warren.io"),
        ("delete", "nodes"),
        ("get", "secrets", "-A"),
        ("list", "pods", "-A"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ]:
        assert not can("warren-mesh-operator", *what), what
    # The agent talks to etcd only.
    for what in [("get", "meshes.mesh.warren.io"), ("list", "nodes"), ("get", "secrets", "-A"), ("get", "pods")]:
        assert not can("warren-mesh-agent", *what), what
    # The enroller reviews tokens and reads the agent pods and the nodes they name; nothing else.
    for what in [
        ("create", "tokenreviews.authentication.k8s.io"),
        ("get", "pods", "-n", "warren-mesh"),
        ("get", "nodes"),
    ]:
        assert can("warren-mesh-enroller", *what), what
    for what in [
        ("get", "pods", "-n", "default"),
        ("list", "pods", "-n", "warren-mesh"),
        ("get", "secrets", "-n", "warren-mesh"),
        ("create", "serviceaccounts/token", "-n", "warren-mesh"),
        ("patch", "nodes"),
        ("get", "meshes.mesh.warren.io"),
    ]:
        assert not can("warren-mesh-enroller", *what), what


def test_kubectl_edits_reach_every_agent(
    cluster: Cluster, mesh_etcd: EtcdServer, operator: OperatorProcess, agents: Agents
) -> None:
    cluster.kubectl("apply", "-f", "-", input=MESH)
    config = wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config in etcd", operator.log)
    assert json.loads(config)["mtu"] == 1400 and json.loads(config)["lease_ttl_seconds"] == 3
    assert json.loads(config)["key_rotation_interval_hours"] == 720  # the nodes' keys are new: none rotates
    for name in ("node-a", "node-b", "node-c"):
        agents.start(name)
    wait_for(lambda: agents.mtus() == {1400}, 20, "every agent on MTU 1400")
    wait_for(lambda: all(len(b.peers) == 2 for b in agents.backends.values()), 20, "a full mesh")

    # An MTU edit is applied by every agent without a restart.
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"mtu":1380}}')
    wait_for(lambda: agents.mtus() == {1380}, 20, "every agent on MTU 1380", operator.log)

    # kubectl shows the mesh: MeshNodes and the Mesh's status columns.
    wait_for(lambda: "3" in cluster.kubectl("get", "wmesh", "default", "--no-headers").split(), 20, "status nodes=3")
    nodes = cluster.kubectl("get", "meshnodes", "--no-headers")
    assert sorted(line.split()[0] for line in nodes.splitlines()) == ["node-a", "node-b", "node-c"]
    node_a = cluster.get("meshnode", "node-a")
    assert node_a["spec"]["publicKey"] in agents.backends["node-b"].peers
    assert node_a["spec"]["overlayIP"].startswith("10.96.")
    assert 0 <= node_a["status"]["leaseSecondsLeft"] <= 3 and node_a["status"]["lastSeen"].endswith("Z")
    assert condition(cluster.get("wmesh", "default"))["reason"] == "Applied"

    # A MeshPeer becomes a peer of every agent, and leaves when deleted.
    cluster.kubectl("apply", "-f", "-", input=PEER)
    wait_for(lambda: all(PEER_KEY in b.peers for b in agents.backends.values()), 20, "the MeshPeer everywhere")
    spec = agents.backends["node-a"].peers[PEER_KEY]
    assert spec.endpoint == "192.0.2.7:51820" and spec.allowed_ips == ("10.96.250.1/32", "192.168.77.0/24")
    assert condition(cluster.get("meshpeer", "laptop"))["reason"] == "Accepted"
    cluster.kubectl("delete", "meshpeer", "laptop", "--timeout=30s")
    wait_for(lambda: all(PEER_KEY not in b.peers for b in agents.backends.values()), 20, "the MeshPeer gone")
    assert etcd_value(mesh_etcd, SCHEMA.peer("laptop")) is None
    time.sleep(PASS_INTERVAL + 1)  # a full pass of the mesh loop later, it has not come back (no flapping)
    for backend in agents.backends.values():
        touched = [op.action for op in backend.operations if op.target == PEER_KEY]
        assert touched == ["set_peer", "remove_peer"], touched


def test_invalid_edits_are_refused_or_reported_and_change_nothing(
    cluster: Cluster, mesh_etcd: EtcdServer, operator: OperatorProcess
) -> None:
    cluster.kubectl("apply", "-f", "-", input=MESH)
    before = wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)

    # What the schema can say, the API server refuses.
    for patch, complaint in (
        ('{"spec":{"listenPort":70000}}', "spec.listenPort"),
        ('{"spec":{"leaseTTLSeconds":1}}', "spec.leaseTTLSeconds"),
        ('{"spec":{"mtu":"jumbo"}}', "spec.mtu"),
        ('{"spec":{"overlayCIDR":"10.96.0.0/40"}}', "spec.overlayCIDR"),
        ('{"spec":{"podCIDR":"pods"}}', "spec.podCIDR"),
        ('{"spec":{"nodeSubnetPrefixLength":0}}', "spec.nodeSubnetPrefixLength"),
    ):
        out = cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", patch, check=False)
        assert complaint in out and "Invalid value" in out, out
    bad_peer = PEER.replace(PEER_KEY, "not-a-key")
    assert "spec.publicKey" in cluster.kubectl("apply", "-f", "-", input=bad_peer, check=False)

    # What only the agents' rules can say (host bits in the CIDR), the operator reports, writing nothing.
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"overlayCIDR":"10.96.0.1/16"}}')
    refused = wait_for(
        lambda: (
            condition(cluster.get("wmesh", "default")).get("reason") == "InvalidSpec"
            and condition(cluster.get("wmesh", "default"))
        ),
        20,
        "the InvalidSpec condition",
        operator.log,
    )
    assert refused["status"] == "False" and "host bits" in refused["message"]
    assert etcd_value(mesh_etcd, SCHEMA.config) == before
    # The pod network: overlapping the overlay, or no room for two node subnets.
    for spec, complaint in (
        ('{"overlayCIDR":"10.96.0.0/16","podCIDR":"10.96.128.0/17"}', "podCIDR 10.96.128.0/17 overlaps overlayCIDR"),
        ('{"overlayCIDR":"10.96.0.0/16","podCIDR":"10.244.0.0/24","nodeSubnetPrefixLength":24}', "must be longer"),
    ):
        cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", f'{{"spec":{spec}}}')
        wait_for(
            lambda complaint=complaint: complaint in condition(cluster.get("wmesh", "default")).get("message", ""),
            20,
            complaint,
            operator.log,
        )
        assert etcd_value(mesh_etcd, SCHEMA.config) == before
    cluster.kubectl(
        "patch", "wmesh", "default", "--type=json", "-p", '[{"op":"remove","path":"/spec/nodeSubnetPrefixLength"}]'
    )
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"podCIDR":"10.244.0.0/16"}}')

    # A second Mesh on the same prefix would overwrite the first one's config: refused, nothing written.
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"overlayCIDR":"10.96.0.0/16"}}')
    second = MESH.replace("name: default", "name: second").replace("mtu: 1400", "mtu: 1300")
    cluster.kubectl("apply", "-f", "-", input=second)
    wait_for(lambda: condition(cluster.get("wmesh", "second")).get("reason") == "PrefixTaken", 20, "PrefixTaken")
    assert etcd_value(mesh_etcd, SCHEMA.config) == before


def test_an_overlay_change_that_would_leave_nodes_out_is_refused_and_widening_is_not(
    cluster: Cluster, mesh_etcd: EtcdServer, operator: OperatorProcess, agents: Agents
) -> None:
    cluster.kubectl("apply", "-f", "-", input=MESH)
    before = wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)
    agents.start("a")
    agents.start("b")
    wait_for(lambda: all(len(b.peers) == 1 for b in agents.backends.values()), 20, "the mesh of a and b")
    addresses = {name: b.interface.addresses if b.interface else None for name, b in agents.backends.items()}

    # Renumbering the live mesh by an edit: refused and reported, nothing written, no device touched.
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"overlayCIDR":"10.97.0.0/16"}}')
    refused = wait_for(
        lambda: (
            condition(cluster.get("wmesh", "default")).get("reason") == "OverlayCIDRInUse"
            and condition(cluster.get("wmesh", "default"))
        ),
        20,
        "the OverlayCIDRInUse condition",
        operator.log,
    )
    assert refused["status"] == "False" and "2 registered node(s) (a, b)" in refused["message"], refused
    time.sleep(PASS_INTERVAL + 1)
    assert etcd_value(mesh_etcd, SCHEMA.config) == before
    assert {n: b.interface.addresses if b.interface else None for n, b in agents.backends.items()} == addresses
    assert all(len(b.peers) == 1 for b in agents.backends.values())

    # Widening keeps every node inside: written, and the agents take it.
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"overlayCIDR":"10.96.0.0/12"}}')
    wait_for(
        lambda: all(
            b.interface is not None and b.interface.addresses[0].endswith("/12") for b in agents.backends.values()
        ),
        20,
        "every device on the wider overlay",
        operator.log,
    )
    assert condition(cluster.get("wmesh", "default")).get("reason") == "Applied"


def test_meshnodes_follow_registrations_and_deleted_nodes_are_revoked(
    cluster: Cluster,
    mesh_etcd: EtcdServer,
    operator: OperatorProcess,
    agent_process: Any,
) -> None:
    cluster.kubectl("apply", "-f", "-", input=MESH)
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)
    victim: AgentProcess = agent_process(mesh_etcd, PREFIX, "victim", port=free_port(), ttl=3)
    victim.start()
    wait_for(lambda: cluster.get("meshnode", "victim"), 20, "MeshNode victim", operator.log)
    victim.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    wait_for(lambda: cluster.get("meshnode", "victim") is None, 3 + 10, "MeshNode victim gone after its lease")
    # Not a Kubernetes node: it keeps its address and subnet for when it comes back.
    assert len(etcd_keys(mesh_etcd, SCHEMA.claims_of("victim"))) == 2

    # A Kubernetes Node deleted: its registration is revoked at once, long before its 30 s lease would expire.
    cluster.kubectl("apply", "-f", "-", input="apiVersion: v1\nkind: Node\nmetadata:\n  name: frozen\n")
    frozen: AgentProcess = agent_process(mesh_etcd, PREFIX, "frozen", port=free_port(), ttl=30)
    frozen.start()
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.node("frozen")), 20, "frozen's registration")
    assert len(etcd_keys(mesh_etcd, SCHEMA.claims_of("frozen"))) == 2  # its overlay address and its pod subnet
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)  # alive but silent: no re-register
    try:
        cluster.kubectl("delete", "node", "frozen")
        wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.node("frozen")) is None, 10, "revocation", operator.log)
        wait_for(lambda: not etcd_keys(mesh_etcd, SCHEMA.claims_of("frozen")), 10, "its claims freed", operator.log)
        wait_for(lambda: cluster.get("meshnode", "frozen") is None, 10, "MeshNode frozen gone")
    finally:
        frozen.process.send_signal(signal.SIGCONT)


def test_a_node_deleted_while_no_operator_ran_has_its_claims_freed(
    cluster: Cluster,
    mesh_etcd: EtcdServer,
    operator: OperatorProcess,
    agent_process: Any,
) -> None:
    """The operator may run on the very node that dies: a Node deleted meanwhile is caught up when the operator
    runs again (the MeshNode remembers that its node was a Kubernetes Node)."""
    cluster.kubectl("apply", "-f", "-", input=MESH)
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)
    cluster.kubectl("apply", "-f", "-", input="apiVersion: v1\nkind: Node\nmetadata:\n  name: lost\n")
    lost: AgentProcess = agent_process(mesh_etcd, PREFIX, "lost", port=free_port(), ttl=3)
    lost.start()
    wait_for(lambda: cluster.get("meshnode", "lost"), 20, "MeshNode lost", operator.log)
    assert cluster.get("meshnode", "lost")["metadata"]["labels"]["mesh.warren.io/kubernetes-node"] == "true"
    assert len(etcd_keys(mesh_etcd, SCHEMA.claims_of("lost"))) == 2
    operator.stop()
    assert lost.process is not None
    lost.process.send_signal(signal.SIGKILL)  # the machine dies, and the operator with it
    lost.process.wait()
    cluster.kubectl("delete", "node", "lost")
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.node("lost")) is None, 3 + 5, "lost's lease to expire")
    operator.start()
    wait_for(lambda: not etcd_keys(mesh_etcd, SCHEMA.claims_of("lost")), 20, "its claims freed", operator.log)
    wait_for(lambda: cluster.get("meshnode", "lost") is None, 10, "MeshNode lost gone")


def test_surplus_claims_a_node_leaves_are_removed_by_the_operator(
    cluster: Cluster, mesh_etcd: EtcdServer, operator: OperatorProcess
) -> None:
    """Claims of a node beyond one of each kind take nothing (issue 28); when no agent of that node removes them
    (its credential used by someone else while its agent is away), the operator does after a grace."""
    cluster.kubectl("apply", "-f", "-", input=MESH)
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)
    held = [SCHEMA.claim("rogue", "10.96.9.1"), SCHEMA.claim("rogue", "10.244.9.0/24", "pods")]
    surplus = [SCHEMA.claim("rogue", f"10.96.9.{i}") for i in range(2, 6)]
    surplus.append(SCHEMA.claim("rogue", "10.244.10.0/24", "pods"))

    async def write() -> None:
        store = mesh_etcd.admin_store()
        try:
            for key in [*held, *surplus]:  # one by one: the held ones first, so the oldest
                await store.put(key, b"")
        finally:
            await store.close()

    asyncio.run(write())
    started = time.monotonic()
    wait_for(
        lambda: sorted(etcd_keys(mesh_etcd, SCHEMA.claims_of("rogue"))) == sorted(held),
        40,
        "surplus removed",
        operator.log,
    )
    assert time.monotonic() - started >= SURPLUS_GRACE - 1, "removed before its owner had its grace"
    assert "removed 5 surplus claim(s)" in operator.log()


def test_a_node_over_its_quota_is_reported_on_its_mesh_node_and_mesh(
    cluster: Cluster, mesh_etcd: EtcdServer, operator: OperatorProcess, agent_process: Any
) -> None:
    """What a node holds under its own keys in etcd is on its MeshNode (condition WithinQuota) and, past the soft
    quota, on the Mesh's status too, until it is back within it."""
    cluster.kubectl("apply", "-f", "-", input=MESH)
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)
    heavy: AgentProcess = agent_process(mesh_etcd, PREFIX, "heavy", port=free_port(), ttl=30)
    heavy.start()

    def quota_reason() -> str | None:
        node = cluster.get("meshnode", "heavy") or {}
        conditions = (node.get("status") or {}).get("conditions") or []
        return next((c["reason"] for c in conditions if c["type"] == "WithinQuota"), None)

    wait_for(lambda: quota_reason() == "WithinQuota", 20, "MeshNode heavy within its quota", operator.log)
    blob = SCHEMA.claims_of("heavy") + "extra/blob"
    asyncio.run(_put(mesh_etcd, blob, b"x" * (DEFAULT_QUOTA.soft_bytes + 1)))
    wait_for(lambda: quota_reason() == "OverSoftQuota", 20, "MeshNode heavy over its soft quota", operator.log)
    over = cluster.get("wmesh", "default")["status"]["overQuota"]
    assert [(o["node"], o["level"]) for o in over] == [("heavy", "soft")] and "soft quota" in over[0]["message"]
    asyncio.run(_delete(mesh_etcd, blob))
    wait_for(lambda: quota_reason() == "WithinQuota", 20, "MeshNode heavy within its quota again", operator.log)
    wait_for(lambda: not cluster.get("wmesh", "default")["status"]["overQuota"], 10, "Mesh status without it")


async def _put(etcd: EtcdServer, key: str, value: bytes) -> None:
    store = etcd.admin_store()
    try:
        await store.put(key, value)
    finally:
        await store.close()


async def _delete(etcd: EtcdServer, key: str) -> None:
    store = etcd.admin_store()
    try:
        await store.delete(key)
    finally:
        await store.close()


def test_operator_catches_up_after_its_own_and_etcds_restart(
    cluster: Cluster, mesh_etcd: EtcdServer, operator: OperatorProcess
) -> None:
    cluster.kubectl("apply", "-f", "-", input=MESH)
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.config), 20, "the config", operator.log)

    # Operator down: edits made meanwhile are applied when it is back.
    operator.kill()
    cluster.kubectl("apply", "-f", "-", input=PEER)
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"mtu":1300}}')
    operator.start()
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.peer("laptop")), 30, "the peer after a restart", operator.log)
    wait_for(
        lambda: json.loads(etcd_value(mesh_etcd, SCHEMA.config) or b"{}").get("mtu") == 1300,
        30,
        "the MTU after a restart",
    )

    # etcd down: an edit waits, and lands once etcd is back.
    mesh_etcd.stop()
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", '{"spec":{"mtu":1280}}')
    subprocess.run(["sleep", "2"], check=True)
    mesh_etcd.start()
    wait_for(
        lambda: json.loads(etcd_value(mesh_etcd, SCHEMA.config) or b"{}").get("mtu") == 1280,
        40,
        "the MTU after etcd came back",
        operator.log,
    )


def test_a_nodes_topology_label_becomes_its_location_and_follows_a_relabel(
    cluster: Cluster,
    mesh_etcd: EtcdServer,
    operator: OperatorProcess,
    agent_process: Any,
) -> None:
    """docs/topology.md: the Mesh's topologyLabel names the Node label that says each node's location; the operator
    writes it under locations/<node>, the node's agent publishes it in its own record, the MeshNode shows it, and a
    relabelled Node moves. A Mesh without the label writes none."""
    label = "topology.kubernetes.io/zone"
    cluster.kubectl("apply", "-f", "-", input=MESH + f"  topologyLabel: {label}\n")
    node = f"apiVersion: v1\nkind: Node\nmetadata:\n  name: zoned\n  labels:\n    {label}: eu-1\n"
    cluster.kubectl("apply", "-f", "-", input=node)
    wait_for(lambda: etcd_value(mesh_etcd, SCHEMA.location("zoned")) == b"eu-1", 20, "the location", operator.log)
    zoned: AgentProcess = agent_process(mesh_etcd, PREFIX, "zoned", port=free_port(), ttl=3)
    zoned.start()

    def published() -> str | None:
        value = etcd_value(mesh_etcd, SCHEMA.node("zoned"))
        return None if value is None else json.loads(value).get("location")

    wait_for(lambda: published() == "eu-1", 20, "zoned's record in eu-1", zoned.log)
    wait_for(
        lambda: (cluster.get("meshnode", "zoned") or {}).get("spec", {}).get("location") == "eu-1",
        20,
        "MeshNode zoned in eu-1",
        operator.log,
    )
    cluster.kubectl("label", "node", "zoned", f"{label}=eu-2", "--overwrite")
    wait_for(lambda: published() == "eu-2", LOCATION_REFRESH + 15, "zoned's record in eu-2", operator.log)
    cluster.kubectl("apply", "-f", "-", input=MESH)  # no topologyLabel: no locations
    wait_for(lambda: published() is None, PASS_INTERVAL + 15, "zoned in no location", operator.log)
    assert not etcd_keys(mesh_etcd, SCHEMA.locations)
    cluster.kubectl("delete", "node", "zoned")
