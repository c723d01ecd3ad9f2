"""Node identity in Kubernetes, against the real API server: an agent pod's projected token gets an etcd
certificate for the node the pod runs on (checked by TokenReview and the pod's own record), never for another
node, and never for a token that is not an agent pod's. The certificate then writes that node's keys only."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from k8s_cluster import Cluster
from warren_mesh.identity import pki
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.etcd_server import EtcdServer, free_port
from warren_mesh.testkit.waiting import wait_for
from warren_mesh.values.keyspace import KeySchema

NAMESPACE = "warren-mesh"
SCHEMA = KeySchema()
ENROLLER_NAME = "warren-mesh-enroller.warren-mesh.svc"  # the name deploy/README.md gives its certificate
OBJECTS = f"""
apiVersion: v1
kind: Node
metadata: {{name: enroll-a}}
---
apiVersion: v1
kind: Node
metadata: {{name: enroll-b}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: intruder, namespace: {NAMESPACE}}}
automountServiceAccountToken: false
""" + "".join(
    f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {NAMESPACE}}}
spec:
  nodeName: {node}
  serviceAccountName: {account}
  automountServiceAccountToken: false
  containers: [{{name: agent, image: "warren-mesh:0.1.0"}}]
"""
    for pod, node, account in (
        ("agent-a", "enroll-a", "warren-mesh-agent"),
        ("agent-b", "enroll-b", "warren-mesh-agent"),
        ("intruder-b", "enroll-b", "intruder"),
    )
)


@pytest.fixture
def enroller(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """A TLS etcd with auth on, the objects above, and `warren-mesh enroller` as its own service account."""
    directory = tmp_path / "pki"
    pki.init(directory, ["127.0.0.1"])
    pki.issue(directory, "enroller", pki.ENROLLER_USER, server_names=["127.0.0.1", ENROLLER_NAME])
    cluster.kubectl("apply", "-f", "-", input=OBJECTS)
    port = free_port()
    with EtcdServer(pki=directory) as etcd:
        etcd.enable_auth()
        log = (tmp_path / "enroller.log").open("wb")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "warren_mesh.cli",
                "enroller",
                *etcd.client_flags(),
                f"--listen-address=127.0.0.1:{port}",
                f"--pki-dir={directory}",
                f"--tls-cert-file={directory / 'enroller.pem'}",
                f"--tls-key-file={directory / 'enroller-key.pem'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, KUBECONFIG=str(cluster.state / "kubeconfig-enroller")),
        )
        try:
            url = f"https://127.0.0.1:{port}"
            _wait_healthy(url, directory / "ca.pem", process)
            yield url, directory, etcd.endpoint
        finally:
            process.terminate()
            process.wait(15)
            log.close()
            cluster.kubectl("delete", "-f", "-", "--grace-period=0", "--force", input=OBJECTS, check=False)


def _wait_healthy(url: str, ca: Path, process: subprocess.Popen[bytes]) -> None:
    import ssl

    context = ssl.create_default_context(cafile=str(ca))

    def healthy() -> bool:
        assert process.poll() is None, "the enroller exited"
        try:
            with urllib.request.urlopen(f"{url}/healthz", context=context, timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    wait_for(healthy, 30, "the enroller to answer", interval=0.1)


def _token(cluster: Cluster, account: str, *, pod: str | None, audience: str = "warren-mesh") -> str:
    """What the kubelet puts in a pod's projected token volume (the TokenRequest API), made here as the admin."""
    args = ["create", "token", account, "-n", NAMESPACE, f"--audience={audience}", "--duration=10m"]
    if pod is not None:
        args += ["--bound-object-kind=Pod", f"--bound-object-name={pod}"]
    return cluster.kubectl(*args).strip()


def _enroll(url: str, directory: Path, token: str, work: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "token").write_text(token)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "enroll",
            f"--enroller={url}",
            f"--enroller-ca-file={directory / 'ca.pem'}",
            f"--token-file={work / 'token'}",
            f"--dir={work / 'etcd'}",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _common_name(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_a_pods_token_gets_a_certificate_for_its_own_node_only(
    cluster: Cluster, enroller: tuple[str, Path, str], tmp_path: Path
) -> None:
    url, directory, etcd_endpoint = enroller
    own = _enroll(url, directory, _token(cluster, "warren-mesh-agent", pod="agent-a"), tmp_path / "a")
    assert own.returncode == 0, own.stderr
    cert, key = tmp_path / "a" / "etcd" / "node.pem", tmp_path / "a" / "etcd" / "node-key.pem"
    assert _common_name(cert) == "node-enroll-a"
    assert key.stat().st_mode & 0o777 == 0o600 and "PRIVATE KEY" not in own.stdout + own.stderr

    # Reached at an address (deploy/'s agents use the enroller Service's ClusterIP, there before cluster DNS is): the
    # certificate is still checked for the URL's host name, and one it does not carry is refused.
    token_a = _token(cluster, "warren-mesh-agent", pod="agent-a")
    port = urllib.parse.urlsplit(url).port
    named = f"https://{ENROLLER_NAME}:{port}"
    at_address = _enroll(named, directory, token_a, tmp_path / "named", "--enroller-address=127.0.0.1")
    assert at_address.returncode == 0, at_address.stderr
    assert _common_name(tmp_path / "named" / "etcd" / "node.pem") == "node-enroll-a"
    wrong = _enroll(
        f"https://elsewhere.example:{port}", directory, token_a, tmp_path / "wrong", "--enroller-address=127.0.0.1"
    )
    assert wrong.returncode == 1 and "is not trusted" in wrong.stderr and "elsewhere.example" in wrong.stderr, wrong
    assert wrong.stderr.count("\n") == 1 and not (tmp_path / "wrong" / "etcd" / "node.pem").exists()
    # A pod made before the Service: the kubelet left the reference as it was.
    unexpanded = "--enroller-address=$(WARREN_MESH_ENROLLER_SERVICE_HOST)"
    early = _enroll(named, directory, token_a, tmp_path / "early", unexpanded)
    assert early.returncode == 1 and "was not expanded: no such Service (yet)" in early.stderr, early.stderr

    # The same pod's token, asking for another node: refused, nothing written.
    other = _enroll(
        url, directory, _token(cluster, "warren-mesh-agent", pod="agent-a"), tmp_path / "x", "--node-name=enroll-b"
    )
    assert other.returncode == 1 and "runs on node enroll-a, not on 'enroll-b'" in other.stderr, other.stderr
    assert not (tmp_path / "x" / "etcd" / "node.pem").exists()

    refusals = {
        "a token for another audience": (_token(cluster, "warren-mesh-agent", pod="agent-a", audience="other"), "401"),
        "a token bound to no pod": (_token(cluster, "warren-mesh-agent", pod=None), "not bound to a pod"),
        "another service account's pod": (_token(cluster, "intruder", pod="intruder-b"), "not the agent's"),
        "no token at all": ("garbage", "401"),
    }
    for case, (token, message) in refusals.items():
        refused = _enroll(url, directory, token, tmp_path / case.replace(" ", "-"))
        assert refused.returncode == 1 and message in refused.stderr, (case, refused.stderr)
        assert refused.stderr.count("\n") == 1, f"{case}: not one line: {refused.stderr}"

    # A pod that is gone: its token no longer gets anything.
    b_token = _token(cluster, "warren-mesh-agent", pod="agent-b")
    cluster.kubectl("delete", "pod", "agent-b", "-n", NAMESPACE, "--grace-period=0", "--force")
    gone = _enroll(url, directory, b_token, tmp_path / "b")
    assert gone.returncode == 1 and "refused (401)" in gone.stderr, gone.stderr

    # The certificate writes its node's keys and nothing else (the enroller gave it its user and role).
    async def writes() -> None:
        store = EtcdStore(etcd_endpoint, tls=EtcdTls(directory / "ca.pem", cert, key))
        try:
            await store.put(SCHEMA.node("enroll-a"), b"{}")
            await store.put(SCHEMA.claim("enroll-a", "10.96.0.9"), b"")
            for forbidden in (SCHEMA.node("enroll-b"), SCHEMA.claim("enroll-b", "10.96.0.9"), SCHEMA.config):
                with pytest.raises(StoreError, match="PERMISSION_DENIED"):
                    await store.put(forbidden, b"{}")
        finally:
            await store.close()

    asyncio.run(writes())

    # Renewal: nothing while the certificate is far from expiry; a new certificate for the same key when due.
    kept = _enroll(url, directory, _token(cluster, "warren-mesh-agent", pod="agent-a"), tmp_path / "a")
    assert kept.returncode == 0 and "kept" in kept.stdout
    before = x509.load_pem_x509_certificate(cert.read_bytes())
    renewed = _enroll(
        url, directory, _token(cluster, "warren-mesh-agent", pod="agent-a"), tmp_path / "a", "--renew-within-days=400"
    )
    assert renewed.returncode == 0, renewed.stderr
    after = x509.load_pem_x509_certificate(cert.read_bytes())
    assert after.serial_number != before.serial_number and after.public_key() == before.public_key()

    # The sidecar: `enroll --watch` keeps renewing when due (here: always, every second), a whole file each time.
    token_file = tmp_path / "a" / "token"
    sidecar = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "enroll",
            "--watch",
            "--check-interval=1",
            "--renew-within-days=400",
            f"--enroller={url}",
            f"--enroller-ca-file={directory / 'ca.pem'}",
            f"--token-file={token_file}",
            f"--dir={tmp_path / 'a' / 'etcd'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        serials = {after.serial_number}

        def renewed_twice() -> bool:
            serials.add(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number)
            return len(serials) >= 3

        wait_for(renewed_twice, 20, "the sidecar to renew twice", interval=0.2)
        assert sidecar.poll() is None, "enroll --watch ended"
        # A pod stop: SIGTERM ends it at once and cleanly (as process 1 of a container it would otherwise be
        # immune to it, and every stop of the agent's pod would wait out the grace period).
        sidecar.terminate()
        assert sidecar.wait(5) == 0
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait(10)
