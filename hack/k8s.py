#!/usr/bin/env python3
"""A real Kubernetes API server on loopback, for the operator's tests and for trying the operator by hand.

    hack/k8s-up [STATE_DIR]     build kube-apiserver once (hack/k8s-build), start etcd + kube-apiserver, print the
                                admin kubeconfig's path as the last line
    hack/k8s-down [STATE_DIR]   stop both and remove STATE_DIR

There is no kubelet or controller manager: objects are stored and validated, RBAC is enforced, pods never run
(validate workloads with `kubectl apply --dry-run=server`). Authentication is by static tokens: an admin, and the
operator's, the agent's and the enroller's service accounts (kubeconfig-operator, -agent, -enroller in
STATE_DIR), so tests can act with exactly the permissions the manifests in deploy/ grant.
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

from warren_mesh.lab.etcd_server import EtcdServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = Path(os.environ.get("WARREN_MESH_K8S_DIR", f"/tmp/warren-mesh-k8s-{os.getuid()}"))
NAMESPACE = "warren-mesh"
# name -> (user, groups) of the static tokens written at start
IDENTITIES = {
    "admin": ("admin", ["system:masters"]),
    "operator": (f"system:serviceaccount:{NAMESPACE}:warren-mesh-operator", ["system:serviceaccounts"]),
    "agent": (f"system:serviceaccount:{NAMESPACE}:warren-mesh-agent", ["system:serviceaccounts"]),
    "enroller": (f"system:serviceaccount:{NAMESPACE}:warren-mesh-enroller", ["system:serviceaccounts"]),
}


def build() -> Path:
    result = subprocess.run([str(ROOT / "hack" / "k8s-build")], stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1]) / "kube-apiserver"


def up(state: Path) -> Path:
    apiserver = build()
    if (state / "state.json").exists():
        down(state)
    state.mkdir(parents=True, exist_ok=True)
    (state / "etcd").mkdir(exist_ok=True)
    etcd = EtcdServer(state / "etcd", outlive_parent=True)
    etcd.start()
    pids = {"etcd": etcd.pid}
    _save(state, pids)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (state / "sa.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (state / "sa.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    tokens = {name: secrets.token_hex(16) for name in IDENTITIES}
    with (state / "tokens.csv").open("w") as out:
        for name, (user, groups) in IDENTITIES.items():
            out.write(f'{tokens[name]},{user},{user},"{",".join(groups)}"\n')
    os.chmod(state / "tokens.csv", 0o600)

    port = free_port()
    certs = state / "certs"
    with (state / "kube-apiserver.log").open("ab") as log:
        process = subprocess.Popen(
            [
                str(apiserver),
                f"--etcd-servers={etcd.endpoint}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={certs}",
                "--endpoint-reconciler-type=none",
                f"--token-auth-file={state / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={state / 'sa.pub'}",
                f"--service-account-signing-key-file={state / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--enable-priority-and-fairness=false",
                # As kubeadm and managed clusters run it: a CNI DaemonSet needs one privileged init container.
                "--allow-privileged=true",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command, like a real control plane; k8s-down stops it
        )
    pids["kube-apiserver"] = process.pid
    _save(state, pids)
    server = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while not _ready(server, certs / "apiserver.crt", tokens["admin"]):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = (state / "kube-apiserver.log").read_text(errors="replace")[-3000:]
            down(state)
            raise SystemExit(f"k8s-up: kube-apiserver did not become ready:\n{tail}")
        time.sleep(0.3)
    for name in IDENTITIES:
        path = state / ("kubeconfig" if name == "admin" else f"kubeconfig-{name}")
        path.write_text(_kubeconfig(server, certs / "apiserver.crt", tokens[name], name))
        os.chmod(path, 0o600)
    return state / "kubeconfig"


def down(state: Path) -> None:
    pids = json.loads((state / "state.json").read_text()) if (state / "state.json").exists() else {}
    for name in ("kube-apiserver", "etcd"):
        pid = pids.get(name)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
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


def _save(state: Path, pids: dict[str, int | None]) -> None:
    (state / "state.json").write_text(json.dumps(pids))


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
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("state_dir", nargs="?", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args()
    if args.command == "up":
        print(up(args.state_dir.resolve()))
    else:
        down(args.state_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
