"""A real kube-apiserver (hack/k8s-up) with the CRDs and RBAC applied, a mesh etcd (TLS and per-node roles, as
deploy/ runs it), and the operator running as its own service account and etcd user: what every operator test
starts from."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8s_cluster import ROOT, Cluster, OperatorProcess
from warren_mesh.identity import pki
from warren_mesh.testkit.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("k8s")
    up = subprocess.run(
        [str(ROOT / "hack" / "k8s-up"), str(state)], capture_output=True, text=True, check=False, timeout=1200
    )
    assert up.returncode == 0, f"hack/k8s-up failed:\n{up.stdout[-2000:]}{up.stderr[-3000:]}"
    assert up.stdout.strip().splitlines()[-1] == str(state / "kubeconfig")
    cluster = Cluster(state)
    try:
        cluster.kubectl("apply", "-f", str(ROOT / "deploy" / "base" / "namespace.yaml"))
        cluster.kubectl("apply", "-k", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
        cluster.kubectl("apply", "-f", str(ROOT / "deploy" / "base" / "rbac.yaml"))
        cluster.kubectl("apply", "-f", str(ROOT / "deploy" / "base" / "config.yaml"))
        yield cluster
    finally:
        subprocess.run([str(ROOT / "hack" / "k8s-down"), str(state)], capture_output=True, check=False)


@pytest.fixture
def mesh_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """The mesh's etcd as deploy/ runs it: TLS, client certificates, auth on with the mesh's roles."""
    pki.init(tmp_path / "pki", ["127.0.0.1"])
    with EtcdServer(pki=tmp_path / "pki") as server:
        server.enable_auth()
        yield server


@pytest.fixture
def operator(cluster: Cluster, mesh_etcd: EtcdServer, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, mesh_etcd.client_flags("operator"), tmp_path / "operator.log")
    process.start()
    try:
        yield process
    finally:
        # Leave the API server as the next test expects it: no mesh objects. The operator's finalizers clean up
        # etcd and MeshNodes while it runs; whatever is left after that is forced out.
        if process.process is None:
            process.start()
        for kind in ("meshpeers", "meshes"):
            cluster.kubectl("delete", kind, "--all", "--timeout=30s", check=False)
        process.stop()
        for kind in ("meshpeers", "meshes", "meshnodes"):
            for item in (cluster.get(kind) or {}).get("items", []):
                name = item["metadata"]["name"]
                cluster.kubectl(
                    "patch", kind, name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False
                )
                cluster.kubectl("delete", kind, name, "--wait=false", check=False)
