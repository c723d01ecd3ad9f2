"""deploy/ on a real cluster: three kubelet nodes with containerd (hack/k8s-up --nodes 3), the project's image built
from deploy/Containerfile, `kubectl apply -k deploy/` for real, ordinary pods on the warren-mesh network.

The tests run in order on one cluster (each builds on the state the one before left): install, pods talking across
nodes through WireGuard only, a rollout of the agents without losing a ping, a node's machine dying and its Node
being deleted, and `kubectl delete -k deploy/` leaving only what deploy/README.md says stays. Opt-in marker
``cluster`` (`./hack/test -m "not cluster"` skips them); CI runs them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import k8s_cgroups
from k8s_cluster import KUBECTL, ROOT, Cluster, readme_secret_commands
from underlay import captured, sniff
from warren_mesh.testkit.waiting import wait_for

pytestmark = [
    pytest.mark.cluster,
    # The first test also starts the cluster: on a fresh machine that builds the images (debootstrap, buildah).
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="kubelets, containerd and namespaces need root"),
]

NODES = 3
K8S = [sys.executable, str(ROOT / "hack" / "k8s.py")]
PROBE_IMAGE = "warren-mesh-probe:test"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")  # the Mesh's default podCIDR (deploy/examples/mesh.yaml keeps it)
# What the test adds to the Mesh to make it dual-stack (the cluster, hack/k8s-up, is dual-stack already).
POD_CIDR6 = ipaddress.ip_network("fd44::/56")
DUAL_STACK = {"spec": {"overlayCIDRs": ["10.96.0.0/16", "fd96::/64"], "podCIDRs": [str(POD_CIDR), str(POD_CIDR6)]}}
NAMESPACE = "warren-mesh"
TRANSFER_BYTES = 20_000_000

# Runs in a probe pod: receive (server) or send (client) TRANSFER_BYTES over one TCP connection.
TCP_SERVER = (
    "import socket\n"
    "connection, _ = socket.create_server(('0.0.0.0', 5201)).accept()\n"
    "total = 0\n"
    "while chunk := connection.recv(65536): total += len(chunk)\n"
    "print(total)"
)
TCP_CLIENT = (
    "import socket, sys\n"
    "connection = socket.create_connection((sys.argv[1], 5201))\n"
    "connection.sendall(b'x' * int(sys.argv[2]))\n"
    "connection.close()"
)


# Runs in a probe pod: end its pings with SIGINT, so that each prints its summary (the image has no pkill).
STOP_PING = (
    "import os, signal\n"
    "for p in filter(str.isdigit, os.listdir('/proc')):\n"
    "    if open(f'/proc/{p}/comm').read().strip() == 'ping': os.kill(int(p), signal.SIGINT)"
)


# Which node is which, decided once the operator has a node (the tests build on each other, in order).
LAYOUT: dict[str, str] = {}


def _k8s(state: Path, *args: str, timeout: float = 1800) -> str:
    done = subprocess.run([*K8S, *args, str(state)], capture_output=True, text=True, check=False, timeout=timeout)
    assert done.returncode == 0, f"hack/k8s.py {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("cluster")
    try:
        _k8s(state, "up", f"--nodes={NODES}")
        _k8s(state, "load-image", f"--containerfile={ROOT / 'tests/k8s/probe.Containerfile'}", f"--tag={PROBE_IMAGE}")
        yield Cluster(state)
    finally:
        subprocess.run([*K8S, "down", str(state)], capture_output=True, check=False, timeout=300)
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert "wmk-" not in leftovers


def _readme_secrets(cluster: Cluster, workdir: Path) -> None:
    """deploy/README.md's certificate and Secret commands, as a user runs them."""
    for program, *args in readme_secret_commands():
        if program == "warren-mesh":
            command = [sys.executable, "-m", "warren_mesh.cli", *args]
            subprocess.run(command, cwd=workdir, check=True, capture_output=True)
        else:
            assert program == "kubectl"
            cluster.kubectl(*args, cwd=workdir)  # the files it names are the ones just made there


def _pods_named(cluster: Cluster, prefix: str) -> dict[str, str]:
    """warren-mesh's pods whose names start with ``prefix``: pod name -> node name."""
    return {
        item["metadata"]["name"]: item["spec"].get("nodeName", "")
        for item in cluster.get("pods", namespace=NAMESPACE)["items"]
        if item["metadata"]["name"].startswith(prefix)
    }


def _ready(cluster: Cluster, kind: str, name: str) -> bool:
    obj = cluster.get(kind, name, namespace=NAMESPACE)
    if not obj:
        return False
    status = obj.get("status", {})
    if kind == "daemonset":
        return bool(status.get("numberReady") == status.get("desiredNumberScheduled") == NODES)
    return bool(status.get("readyReplicas") == obj["spec"].get("replicas", 1))


def _diagnosis(cluster: Cluster) -> str:
    """What a user would look at when an install hangs: every pod, the events, the last log lines of our pods."""
    parts = [cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False)]
    parts.append(cluster.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)[-4000:])
    for item in (cluster.get("pods", namespace=NAMESPACE) or {}).get("items", []):
        for status in item.get("status", {}).get("initContainerStatuses", []) + item.get("status", {}).get(
            "containerStatuses", []
        ):
            if not status.get("ready"):
                name = item["metadata"]["name"]
                log = cluster.kubectl("logs", "-n", NAMESPACE, name, "-c", status["name"], "--tail=15", check=False)
                parts.append(f"--- {name}/{status['name']} ---\n{log}")
    return "\n".join(parts)


def _not_ready_nodes(cluster: Cluster) -> list[str]:
    return [
        item["metadata"]["name"]
        for item in (cluster.get("nodes") or {}).get("items", [])
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in item["status"]["conditions"])
    ]


def _nodes(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item["spec"] for item in (cluster.get("meshnodes") or {}).get("items", [])}


def _probe(cluster: Cluster, name: str, node: str) -> str:
    """An ordinary pod (pod network, no privileges) on ``node``; its (first) address."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "probe", "image": PROBE_IMAGE, "command": ["sleep", "infinity"]}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_for(lambda: (cluster.get("pod", name) or {}).get("status", {}).get("phase") == "Running", 120, f"{name}")
    address: str = cluster.get("pod", name)["status"]["podIP"]
    return address


def _pod_ips(cluster: Cluster, name: str) -> list[str]:
    """Every address of pod ``name``, as its kubelet reported them (dual-stack: one of each family)."""
    return [entry["ip"] for entry in cluster.get("pod", name)["status"].get("podIPs", [])]


def _exec(cluster: Cluster, pod: str, *command: str) -> str:
    return cluster.kubectl("exec", "-n", "default", pod, "--", *command)


def test_the_manifests_install_for_real(cluster: Cluster, tmp_path: Path) -> None:
    _readme_secrets(cluster, tmp_path)
    cluster.kubectl("apply", "-k", str(ROOT / "deploy"))
    cluster.kubectl("apply", "-f", str(ROOT / "deploy" / "examples" / "mesh.yaml"))
    for kind, name in (
        ("daemonset", "warren-mesh-agent"),
        ("daemonset", "warren-mesh-wireguard"),
        ("statefulset", "warren-mesh-etcd"),
        ("deployment", "warren-mesh-enroller"),
        ("deployment", "warren-mesh-operator"),
    ):
        wait_for(
            lambda kind=kind, name=name: _ready(cluster, kind, name),
            300,
            f"{kind} {name} ready",
            lambda: _diagnosis(cluster),
        )
    wait_for(lambda: len(_nodes(cluster)) == NODES, 60, "every node in `kubectl get meshnodes`")
    mesh = cluster.get("meshes", "default")
    wait_for(
        lambda: (cluster.get("meshes", "default") or {}).get("status", {}).get("readyNodes") == NODES,
        60,
        "the Mesh's status to count every node ready",
    )
    assert mesh is not None
    # Ready once the kubelet sees the CNI network the agent wrote (it looks every few seconds).
    wait_for(lambda: not _not_ready_nodes(cluster), 60, "every node Ready (the agents' CNI network in place)")
    # The agents enrolled at the enroller Service's ClusterIP, as the kubelet expanded it, not where DNS says.
    cluster_ip = cluster.get("service", "warren-mesh-enroller", namespace=NAMESPACE)["spec"]["clusterIP"]
    for agent in _pods_named(cluster, "warren-mesh-agent-"):
        used = cluster.kubectl(
            "-n", NAMESPACE, "exec", agent, "-c", "renew-certificate", "--", "printenv", "WARREN_MESH_ENROLLER_ADDRESS"
        )
        assert used.strip() == cluster_ip, (agent, used)
    print(cluster.kubectl("get", "nodes,pods", "-A", "-o", "wide"))
    print(cluster.kubectl("get", "wmesh,meshnodes"))


def test_pods_on_two_nodes_reach_each_other_through_wireguard_only(cluster: Cluster) -> None:
    # The probes go where the operator is not: the node that dies later is the operator's, the harder case.
    operator = next(iter(_pods_named(cluster, "warren-mesh-operator-").values()))
    LAYOUT["a"], LAYOUT["b"] = sorted(set(_nodes(cluster)) - {operator})
    LAYOUT["doomed"] = operator
    # The Mesh becomes dual-stack by an edit: every node claims an IPv6 address and pod subnet, and pods made from
    # then on get an address of each family.
    cluster.kubectl("patch", "wmesh", "default", "--type=merge", "-p", json.dumps(DUAL_STACK))
    wait_for(
        lambda: (
            all(
                len(spec.get("overlayIPs", [])) == 2 and any(":" in n for n in spec["allowedIPs"])
                for spec in _nodes(cluster).values()
            )
            and len(_nodes(cluster)) == NODES
        ),
        60,
        "every MeshNode with an IPv6 address and pod subnet",
        lambda: json.dumps(_nodes(cluster)),
    )
    time.sleep(2)  # the agents' next pass writes the conflists with both ranges
    a, b = _probe(cluster, "probe-1", LAYOUT["a"]), _probe(cluster, "probe-2", LAYOUT["b"])
    a6, b6 = (next(ip for ip in _pod_ips(cluster, pod) if ":" in ip) for pod in ("probe-1", "probe-2"))
    assert ipaddress.ip_address(a6) in POD_CIDR6 and ipaddress.ip_address(b6) in POD_CIDR6, (a6, b6)
    subnets = {name: [ipaddress.ip_network(n) for n in spec["allowedIPs"]] for name, spec in _nodes(cluster).items()}
    assert any(ipaddress.ip_address(a) in net and net.subnet_of(POD_CIDR) for net in subnets[LAYOUT["a"]])  # type: ignore[arg-type]
    assert any(ipaddress.ip_address(b) in net and net.subnet_of(POD_CIDR) for net in subnets[LAYOUT["b"]])  # type: ignore[arg-type]
    out = _exec(cluster, "probe-1", "ping", "-c", "3", "-i", "0.2", b)
    assert " 0% packet loss" in out, out
    print(out)
    out = _exec(cluster, "probe-1", "ping", "-c", "3", "-i", "0.2", b6)  # over the mesh's IPv6 pod network
    assert " 0% packet loss" in out, out
    print(out)

    index = int(LAYOUT["a"].removeprefix("node-"))
    sent_before = _sent_through_wireguard(index, to=LAYOUT["b"])
    # probe-1's node's underlay link, from the host's side, until the transfer is over (kubectl exec and the pods'
    # Python start take seconds on a busy machine: a fixed window could end before the transfer does)
    sniffer = sniff(f"wmk{index}", 180)
    server = subprocess.Popen(
        [KUBECTL, f"--kubeconfig={cluster.kubeconfig}", "exec", "probe-2", "--", "python3", "-c", TCP_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        _exec(cluster, "probe-1", "ping", "-c", "3", "-i", "0.2", b6)  # IPv6 too crosses only as WireGuard
        _exec(cluster, "probe-1", "python3", "-c", TCP_CLIENT, b, str(TRANSFER_BYTES))
        received, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    assert int(received.strip()) == TRANSFER_BYTES
    # The WireGuard device itself counted the transfer as sent to probe-2's node...
    sent = _sent_through_wireguard(index, to=LAYOUT["b"]) - sent_before
    assert sent >= TRANSFER_BYTES, f"{sent} bytes through WireGuard to {LAYOUT['b']} for {TRANSFER_BYTES} sent"
    # ... and the underlay carried it as WireGuard: no frame with a pod's address. (The capture, a Python loop, may
    # miss frames on a busy machine; thousands in the clear could not all be missed.)
    frames = captured(sniffer, stop=True)
    pods = (POD_CIDR, POD_CIDR6)
    in_clear = [
        f for f in frames if any(ipaddress.ip_address(ip) in net for ip in (f.source, f.destination) for net in pods)
    ]
    assert not in_clear, f"pod traffic on the underlay in the clear: {in_clear[:5]}"
    wireguard = sum(f.length for f in frames if f.protocol == 17 and {f.sport, f.dport} == {51820})
    assert wireguard >= TRANSFER_BYTES // 2, f"only {wireguard} bytes of WireGuard seen on {LAYOUT['a']}'s link"


def _sent_through_wireguard(index: int, *, to: str) -> float:
    """What node ``index``'s WireGuard device has sent to node ``to``, from its agent's /metrics (host network)."""
    url = f"http://10.213.0.{10 + index}:9587/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("warren_mesh_peer_transmit_bytes_total{") and f'peer="{to}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no warren_mesh_peer_transmit_bytes_total for {to} at {url}")


def test_a_rollout_of_the_agents_loses_no_ping(cluster: Cluster) -> None:
    before = _nodes(cluster)
    b = cluster.get("pod", "probe-2")["status"]["podIP"]
    ping = subprocess.Popen(
        [KUBECTL, f"--kubeconfig={cluster.kubeconfig}", "exec", "probe-1", "--", "ping", "-i", "0.2", "-w", "600", b],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        cluster.kubectl("-n", NAMESPACE, "rollout", "restart", "daemonset/warren-mesh-agent")
        cluster.kubectl("-n", NAMESPACE, "rollout", "status", "daemonset/warren-mesh-agent", "--timeout=300s")
        time.sleep(3)
    finally:
        _exec(cluster, "probe-1", "python3", "-c", STOP_PING)
    out, _ = ping.communicate(timeout=30)
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert summary is not None, out
    sent, received = int(summary[1]), int(summary[2])
    print(f"during the rollout: {sent} pings sent, {received} answered")
    assert sent > 50 and received == sent, out[-600:]
    after = _nodes(cluster)
    assert {n: (s["publicKey"], s["allowedIPs"]) for n, s in after.items()} == {
        n: (s["publicKey"], s["allowedIPs"]) for n, s in before.items()
    }


# Runs in an agent container, with that node's own etcd credential (it may read the whole mesh): the claims of the
# node named in argv[1], one per line.
LIST_CLAIMS = """
import asyncio, os, sys
from pathlib import Path
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore

async def main():
    tls = EtcdTls(*(Path(os.environ[f"WARREN_MESH_ETCD_{what}_FILE"]) for what in ("CA", "CERT", "KEY")))
    store = EtcdStore(os.environ["WARREN_MESH_ETCD_ENDPOINTS"].split(","), tls=tls)
    try:
        for attempt in range(10):  # a member may be gone with its node: the store moves on to the next one
            try:
                listed = await store.list_prefix(KeySchema(sys.argv[2]).claims_of(sys.argv[1]))
                break
            except StoreError:
                await asyncio.sleep(0.5)
        else:
            raise SystemExit("no etcd member answered")
    finally:
        await store.close()
    print("\\n".join(kv.key for kv in listed.items))

asyncio.run(main())
"""


def _claims_of(cluster: Cluster, node: str, *, seen_from: str) -> list[str]:
    agent = next(pod for pod, node in _pods_named(cluster, "warren-mesh-agent-").items() if node == seen_from)
    prefix = cluster.get("meshes", "default")["spec"]["etcdPrefix"]
    out = cluster.kubectl(
        "exec", "-n", NAMESPACE, agent, "-c", "agent", "--", "python3", "-c", LIST_CLAIMS, node, prefix
    )
    return out.split()


def test_a_dead_nodes_registration_and_subnet_go_with_its_node_object(cluster: Cluster) -> None:
    doomed, survivor = LAYOUT["doomed"], LAYOUT["a"]
    assert _claims_of(cluster, doomed, seen_from=survivor), f"{doomed} claimed nothing?"
    b = cluster.get("pod", "probe-2")["status"]["podIP"]
    _k8s(cluster.state, "power-off", f"--node={doomed}")  # the operator dies with it
    cluster.kubectl("delete", "node", doomed)
    # What the pod garbage collector does to the pods of a deleted Node, done now rather than after its 40 s of
    # quarantine: the operator's Deployment then has a pod again at once, and the new operator catches up (it never
    # saw the Node go). Nothing of ours is skipped: the claims are freed by that operator alone.
    cluster.kubectl(
        "delete", "pods", "--all-namespaces", f"--field-selector=spec.nodeName={doomed}", "--force", "--grace-period=0"
    )
    wait_for(lambda: doomed not in _nodes(cluster), 150, f"{doomed} to leave `kubectl get meshnodes`")
    wait_for(lambda: not _claims_of(cluster, doomed, seen_from=survivor), 30, f"{doomed}'s claims to be freed")
    wait_for(
        lambda: (cluster.get("meshes", "default") or {}).get("status", {}).get("nodes") == NODES - 1,
        30,
        "the Mesh's status to count the nodes left",
    )
    out = _exec(cluster, "probe-1", "ping", "-c", "5", "-i", "0.2", b)
    assert " 0% packet loss" in out, out


def test_delete_k_leaves_only_what_the_readme_says_stays(cluster: Cluster) -> None:
    for pod in ("probe-1", "probe-2"):
        cluster.kubectl("delete", "pod", pod, "--wait=true")
    # The Mesh first, while its operator runs (its finalizer cleans etcd), as deploy/README.md says.
    mesh = str(ROOT / "deploy" / "examples" / "mesh.yaml")
    began = time.monotonic()
    # The operator was rescheduled off the dead node by the test before: its new pod has been seen to restart once
    # a minute later (2026-12-07, cause not found yet: the restart's reason and the container's last log lines are
    # printed below). A restarted operator finishes the deletion; a user waits for it as long as this does.
    deleted = cluster.run_kubectl("delete", "-f", mesh, "--timeout=180s")
    restarts, how = _operator_restarts(cluster)
    print(f"the Mesh was deleted in {time.monotonic() - began:.1f} s; the operator: {how}")
    if restarts:  # shown in pytest's summary of a passing run too, until the cause is found
        events = cluster.kubectl("get", "events", "-n", NAMESPACE, check=False).splitlines()
        said = "\n".join(line for line in events if "operator" in line)
        warnings.warn(f"the operator restarted: {how}\n{said[-3000:]}", stacklevel=1)
    if deleted.returncode != 0:
        # What the operator did meanwhile, before and after a restart.
        operator = cluster.kubectl("logs", "-n", NAMESPACE, "deployment/warren-mesh-operator", "--tail=60", check=False)
        previous = cluster.kubectl(
            "logs", "-n", NAMESPACE, "deployment/warren-mesh-operator", "--previous", "--tail=60", check=False
        )
        left = cluster.kubectl("get", "meshes", "default", "-o", "yaml", check=False)
        pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False)
        raise AssertionError(
            f"{deleted.stdout}{deleted.stderr}\n{left}\n--- operator ---\n{operator}\n--- before its last restart "
            f"---\n{previous}\n{pods}"
        )
    cluster.kubectl("delete", "-k", str(ROOT / "deploy"), "--timeout=180s")
    wait_for(lambda: cluster.get("namespace", NAMESPACE) is None, 120, "the namespace warren-mesh to be gone")
    assert "mesh.warren.io" not in cluster.kubectl("get", "crds")
    for node in (LAYOUT["a"], LAYOUT["b"]):  # the third node's machine is gone
        home = cluster.state / "nodes" / node
        holder = int((home / "holder.pid").read_text())
        inside = ["nsenter", f"--target={holder}", "--mount", "--net", "--"]
        links = subprocess.run([*inside, "ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert "wg-mesh" not in links
        sockets = os.listdir(home / "fs" / "run" / "wireguard")
        assert not sockets, f"{node}: {sockets} left in /run/wireguard"
        ours = [pid for pid in _node_processes(node) if _ours(pid)]
        assert not ours, f"{node}: processes of ours left: {ours}"
        # What deploy/README.md says stays ("After kubectl delete -k"): the node's keys, the CNI config and plugins.
        state_files = sorted(str(p.relative_to(home / "fs")) for p in (home / "fs" / "var/lib/warren-mesh").rglob("*"))
        assert "var/lib/warren-mesh/private.key" in state_files
        assert set(os.listdir(home / "fs" / "etc/cni/net.d")) <= {"10-warren-mesh.conflist"}
        tables = subprocess.run([*inside, "nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
        assert set(tables.split("\n")) - {"", "table inet warren-mesh"} <= _kube_proxy_tables(tables), tables


def _operator_restarts(cluster: Cluster) -> tuple[int, str]:
    """How often the operator's container restarted, and why it last ended (OOMKilled, Error, a failed probe)."""
    found = []
    restarts = 0
    for item in cluster.get("pods", namespace=NAMESPACE)["items"]:
        if item["metadata"]["name"].startswith("warren-mesh-operator-"):
            for status in item.get("status", {}).get("containerStatuses", []):
                ended = status.get("lastState", {}).get("terminated") or {}
                restarts += int(status.get("restartCount", 0))
                found.append(
                    f"{status.get('restartCount', 0)} restart(s), last ended: {ended.get('reason', '-')} "
                    f"(exit {ended.get('exitCode', '-')}) at {ended.get('finishedAt', '-')}"
                )
    return restarts, "; ".join(found) or "no pod"


def _ours(pid: int) -> bool:
    """A process of warren-mesh's: the agent, the operator, the enroller, wireguard-go or the bundled etcd."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg) in {b"warren-mesh", b"wireguard-go", b"etcd"} for arg in argv[:2])


def _node_processes(node: str) -> list[int]:
    base = k8s_cgroups.cgroup_dir(node)
    # The node's cgroup is there until k8s-down: if it were not, an empty list would prove nothing.
    assert base.is_dir(), f"{base} is missing: the node's processes cannot be listed"
    return [pid for pid in k8s_cgroups.cgroup_pids(node) if Path(f"/proc/{pid}").exists()]


# What kube-proxy (iptables mode) and the kubelet make through iptables' nft backend: the node's, not ours.
_KUBE_PROXY_TABLES = {f"table {family} {table}" for family in ("ip", "ip6") for table in ("filter", "nat", "mangle")}


def _kube_proxy_tables(listing: str) -> set[str]:
    """The tables of ``listing`` that kube-proxy and the kubelet own; any other table left is someone's leftover."""
    return {line for line in listing.split("\n") if line in _KUBE_PROXY_TABLES}
