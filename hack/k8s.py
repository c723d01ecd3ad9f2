#!/usr/bin/env python3
"""A real Kubernetes API server on loopback, or a whole cluster on this machine, for the tests and for trying
warren-mesh by hand.

    hack/k8s-up [STATE_DIR]     build Kubernetes once (hack/k8s-build), start etcd + kube-apiserver, print the
                                admin kubeconfig's path as the last line
    hack/k8s-up --nodes N [STATE_DIR]
                                the same, plus the controller manager, the scheduler, cluster DNS and N nodes
                                (kubelet, containerd, kube-proxy each; hack/k8s_nodes.py), with the images of
                                hack/k8s_images.py (warren-mesh:0.1.0 from deploy/Containerfile) on every node
    hack/k8s.py load-image [--containerfile FILE --tag NAME] [STATE_DIR]
                                build warren-mesh:0.1.0 again (or FILE as NAME) and load it on every node
    hack/k8s.py power-off --node NAME [STATE_DIR]
                                that node's machine dies (every process of it killed, its network gone)
    hack/k8s-down [STATE_DIR]   stop everything and remove STATE_DIR

Without --nodes there is no kubelet or controller manager: objects are stored and validated, RBAC is enforced,
pods never run (validate workloads with `kubectl apply --dry-run=server`). Authentication is by static tokens: an
admin, and the operator's, the agent's and the enroller's service accounts (kubeconfig-operator, -agent, -enroller
in STATE_DIR), so tests can act with exactly the permissions the manifests in deploy/ grant; with nodes, also each
kubelet (system:node:NAME, checked by the Node authorizer) and kube-proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import k8s_cgroups
import k8s_images
import k8s_nodes
from warren_mesh.testkit.etcd_server import EtcdServer, free_port

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = str(ROOT / ".venv" / "bin" / "kubectl")  # Debian 13's, linked there by hack/setup
DEFAULT_STATE = Path(os.environ.get("WARREN_MESH_K8S_DIR", f"/tmp/warren-mesh-k8s-{os.getuid()}"))
NAMESPACE = "warren-mesh"
# Dual-stack (IPv6DualStack, alpha in 1.20, on in every component): Services get an address of each family, and
# kube-proxy knows both pod networks, the Mesh's default podCIDR and the IPv6 one tests/k8s adds by an edit.
SERVICE_CIDR = "10.0.0.0/24,fd00:10::/112"
POD_CIDR = "10.244.0.0/16,fd44::/56"  # kube-proxy masquerades what comes from outside them
# name -> (user, groups) of the static tokens written at start
IDENTITIES = {
    "admin": ("admin", ["system:masters"]),
    "operator": (f"system:serviceaccount:{NAMESPACE}:warren-mesh-operator", ["system:serviceaccounts"]),
    "agent": (f"system:serviceaccount:{NAMESPACE}:warren-mesh-agent", ["system:serviceaccounts"]),
    "enroller": (f"system:serviceaccount:{NAMESPACE}:warren-mesh-enroller", ["system:serviceaccounts"]),
}


def build() -> Path:
    """The directory of the Kubernetes binaries (hack/k8s-build: built once from Debian's source, then cached)."""
    result = subprocess.run([str(ROOT / "hack" / "k8s-build")], stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def up(state: Path, nodes: int = 0) -> Path:
    """The API server alone (nodes=0), or a whole cluster of ``nodes`` nodes on this machine."""
    if nodes:
        k8s_cgroups.require_cgroup_v1()
    binaries = build()
    if (state / "state.json").exists():
        down(state)
    state.mkdir(parents=True, exist_ok=True)
    (state / "etcd").mkdir(exist_ok=True)
    pids: dict[str, int | None] = {}
    _save(state, pids, nodes=nodes)
    try:
        return _up(state, nodes, binaries, pids)
    except BaseException:
        down(state)
        raise


def _up(state: Path, nodes: int, binaries: Path, pids: dict[str, int | None]) -> Path:
    etcd = EtcdServer(state / "etcd", outlive_parent=True)
    etcd.start()
    pids["etcd"] = etcd.pid
    _save(state, pids, nodes=nodes)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (state / "sa.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (state / "sa.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    identities = dict(IDENTITIES)
    if nodes:
        identities["kube-proxy"] = ("system:kube-proxy", [])
        for index in range(1, nodes + 1):
            name = k8s_nodes.node_name(index)
            identities[name] = (f"system:node:{name}", ["system:nodes"])
    tokens = {name: secrets.token_hex(16) for name in identities}
    with (state / "tokens.csv").open("w") as out:
        for name, (user, groups) in identities.items():
            out.write(f'{tokens[name]},{user},{user},"{",".join(groups)}"\n')
    os.chmod(state / "tokens.csv", 0o600)

    certs = state / "certs"
    if nodes:
        # The nodes reach the control plane over the underlay; the `kubernetes` Service leads pods there.
        k8s_nodes.underlay_up()
        address, port = k8s_nodes.HOST_ADDRESS, 6443
        cluster_flags = [
            f"--advertise-address={address}",
            "--endpoint-reconciler-type=lease",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--kubelet-preferred-address-types=InternalIP",  # the nodes' names are in no DNS
        ]
    else:
        address, port = "127.0.0.1", free_port()
        cluster_flags = [
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            "--authorization-mode=RBAC",
        ]
    pids["kube-apiserver"] = _daemon(
        state,
        "kube-apiserver",
        [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers={etcd.endpoint}",
            f"--bind-address={address}",
            f"--secure-port={port}",
            f"--cert-dir={certs}",
            *cluster_flags,
            f"--token-auth-file={state / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={state / 'sa.pub'}",
            f"--service-account-signing-key-file={state / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            k8s_nodes.DUAL_STACK_GATE,
            "--enable-priority-and-fairness=false",
            # As kubeadm and managed clusters run it: a CNI DaemonSet needs one privileged init container.
            "--allow-privileged=true",
        ],
    )
    _save(state, pids, nodes=nodes)
    server = f"https://{address}:{port}"
    deadline = time.monotonic() + 90
    while not _ready(server, certs / "apiserver.crt", tokens["admin"]):
        apiserver = pids["kube-apiserver"]
        if apiserver is None or not k8s_cgroups.alive(apiserver) or time.monotonic() > deadline:
            tail = (state / "kube-apiserver.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"k8s-up: kube-apiserver did not become ready:\n{tail}")
        time.sleep(0.3)
    for name in identities:
        path = state / ("kubeconfig" if name == "admin" else f"kubeconfig-{name}")
        path.write_text(_kubeconfig(server, certs / "apiserver.crt", tokens[name], name))
        os.chmod(path, 0o600)
    if nodes:
        _cluster_up(state, nodes, binaries, pids, server=server, ca=certs / "apiserver.crt")
    return state / "kubeconfig"


def _cluster_up(state: Path, nodes: int, binaries: Path, pids: dict[str, int | None], *, server: str, ca: Path) -> None:
    admin = state / "kubeconfig"
    common = [f"--kubeconfig={admin}", "--leader-elect=false", "--bind-address=127.0.0.1", "--port=0"]
    pids["kube-controller-manager"] = _daemon(
        state,
        "kube-controller-manager",
        [
            str(binaries / "kube-controller-manager"),
            *common,
            "--secure-port=0",
            f"--service-account-private-key-file={state / 'sa.key'}",
            f"--root-ca-file={ca}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            k8s_nodes.DUAL_STACK_GATE,
            # Pod subnets are the mesh's (its agents claim them in etcd), not the controller manager's.
            "--allocate-node-cidrs=false",
            "--node-monitor-grace-period=20s",
        ],
    )
    pids["kube-scheduler"] = _daemon(
        state, "kube-scheduler", [str(binaries / "kube-scheduler"), *common, "--secure-port=0"]
    )
    (state / "dns-token").write_text(_token(state, "admin"))
    os.chmod(state / "dns-token", 0o600)
    pids["dns"] = _daemon(
        state,
        "dns",
        [
            sys.executable,
            str(ROOT / "hack" / "k8s_dns.py"),
            str(state),
            k8s_nodes.HOST_ADDRESS,
            server,
            str(ca),
            str(state / "dns-token"),
        ],
    )
    _save(state, pids, nodes=nodes)

    print("k8s-up: building the images (deploy/Containerfile with buildah; cached layers)", file=sys.stderr)
    archives = [k8s_images.pause_archive(binaries / "pause"), k8s_images.project_archive()]
    k8s_images.prune()
    k8s_nodes.save_sysctls(state / "sysctls.json")
    node_binaries = k8s_nodes.Binaries(kubelet=binaries / "kubelet", kube_proxy=binaries / "kube-proxy")
    created: list[str] = []
    for index in range(1, nodes + 1):
        node = k8s_nodes.Node(state, index)
        print(f"k8s-up: starting {node.name} ({node.address})", file=sys.stderr)
        try:
            node.create(created)
        finally:
            _save(state, pids, nodes=nodes, mountpoints=created)
        node.start_containerd()
        for archive in archives:
            node.import_image(archive)
        node.start_kubelet(node_binaries, state / f"kubeconfig-{node.name}")
        node.start_kube_proxy(node_binaries, state / "kubeconfig-kube-proxy", POD_CIDR)
        (node.home / "fs" / "var/lib/warren-mesh-k8s-volumes" / "etcd").mkdir(parents=True, exist_ok=True)
    _persistent_volumes(state, nodes)
    deadline = time.monotonic() + 120
    while True:
        listed = _kubectl(state, "get", "nodes", "-o", "name")
        if len(listed.split()) == nodes:
            break
        for index in range(1, nodes + 1):
            node = k8s_nodes.Node(state, index)
            for what in ("containerd", "kubelet", "kube-proxy"):
                if not node.running(what):
                    raise SystemExit(f"k8s-up: {what} of {node.name} exited:\n{node.log_tail(what)}")
        if time.monotonic() > deadline:
            raise SystemExit(f"k8s-up: only {listed.split()} registered in 120 s")
        time.sleep(0.5)


def load_image(state: Path, containerfile: Path | None = None, tag: str | None = None) -> None:
    """Build warren-mesh:0.1.0 from the working tree again (or another Containerfile as ``tag``: a test's image)
    and put it on every node (then roll the workloads)."""
    saved = json.loads((state / "state.json").read_text())
    if containerfile is not None and tag is not None:
        archive = k8s_images.project_archive(containerfile, k8s_images.qualified(tag))
    else:
        archive = k8s_images.project_archive()
    k8s_images.prune()
    for index in range(1, int(saved.get("nodes", 0)) + 1):
        k8s_nodes.Node(state, index).import_image(archive)


def power_off(state: Path, name: str) -> None:
    """A node's machine dies: every process of it (kubelet, containerd, its pods) is killed and its network
    namespace removed, without a word to the API server (delete its Node object to tell the cluster)."""
    saved = json.loads((state / "state.json").read_text())
    for index in range(1, int(saved.get("nodes", 0)) + 1):
        node = k8s_nodes.Node(state, index)
        if node.name == name:
            node.remove()
            return
    raise SystemExit(f"k8s: no node {name!r} in {state}")


def _persistent_volumes(state: Path, nodes: int) -> None:
    """One local volume per node, as a cluster's storage admin provides them (the etcd StatefulSet claims them)."""
    for index in range(1, nodes + 1):
        name = k8s_nodes.node_name(index)
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"local-{name}", "labels": {"warren-mesh-k8s/harness": "true"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "local": {"path": "/var/lib/warren-mesh-k8s-volumes/etcd"},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [name]}
                                ]
                            }
                        ]
                    }
                },
            },
        }
        _kubectl(state, "apply", "-f", "-", input=json.dumps(volume))


def _kubectl(state: Path, *args: str, input: str | None = None) -> str:
    done = subprocess.run(
        [KUBECTL, f"--kubeconfig={state / 'kubeconfig'}", *args],
        input=input,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"k8s-up: kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _token(state: Path, name: str) -> str:
    config = json.loads((state / ("kubeconfig" if name == "admin" else f"kubeconfig-{name}")).read_text())
    return str(config["users"][0]["user"]["token"])


def _daemon(state: Path, name: str, argv: list[str]) -> int:
    with (state / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives this command, like a real control plane; k8s-down stops it
        )
    return process.pid


def down(state: Path) -> None:
    saved = json.loads((state / "state.json").read_text()) if (state / "state.json").exists() else {}
    pids = saved.get("pids", saved)
    nodes = int(saved.get("nodes", 0))
    # The nodes first: their kubelets would otherwise recreate what is being removed.
    for index in range(1, nodes + 1):
        k8s_nodes.Node(state, index).remove()
    for name in ("dns", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        pid = pids.get(name)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
    if nodes:
        k8s_nodes.underlay_down()
        k8s_nodes.restore_sysctls(state / "sysctls.json")
        shutil.rmtree(k8s_images.RUNROOT, ignore_errors=True)
        for mountpoint in reversed(saved.get("mountpoints", [])):
            with contextlib.suppress(OSError):  # only the directories k8s-up made, and only while empty
                os.rmdir(mountpoint)
    shutil.rmtree(state, ignore_errors=True)


def _ready(server: str, ca: Path, token: str) -> bool:
    if not ca.exists():
        return False
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(f"{server}/readyz", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ssl.SSLError):
        return False


def _kubeconfig(server: str, ca: Path, token: str, user: str) -> str:
    # JSON is YAML: kubectl, kopf and our own client all read it.
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "warren-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "warren-test", "user": user}}],
            "current-context": user,
        },
        indent=2,
    )


def _save(state: Path, pids: dict[str, int | None], *, nodes: int, mountpoints: list[str] | None = None) -> None:
    saved = json.loads((state / "state.json").read_text()) if (state / "state.json").exists() else {}
    saved.update(pids=pids, nodes=nodes)
    if mountpoints is not None:
        saved["mountpoints"] = mountpoints
    (state / "state.json").write_text(json.dumps(saved))


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "load-image", "power-off"))
    parser.add_argument("state_dir", nargs="?", type=Path, default=DEFAULT_STATE)
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="start a whole cluster of this many nodes (kubelet, containerd, kube-proxy each) with the controller "
        "manager, the scheduler and cluster DNS; 0 (default): the API server alone",
    )
    parser.add_argument("--containerfile", type=Path, help="load-image: build this Containerfile instead")
    parser.add_argument("--tag", help="load-image: the image name for --containerfile (e.g. probe:test)")
    parser.add_argument("--node", help="power-off: the node whose machine dies (e.g. node-3)")
    args = parser.parse_intermixed_args()
    if args.command == "up":
        try:
            print(up(args.state_dir.resolve(), args.nodes))
        except k8s_cgroups.NodeError as exc:  # the nodes' and their cgroups' errors alike
            raise SystemExit(f"k8s-up: {exc}") from None
    elif args.command == "power-off":
        if not args.node:
            parser.error("power-off needs --node")
        power_off(args.state_dir.resolve(), args.node)
    elif args.command == "load-image":
        if bool(args.containerfile) != bool(args.tag):
            parser.error("--containerfile and --tag go together")
        load_image(args.state_dir.resolve(), args.containerfile, args.tag)
    else:
        down(args.state_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
