"""etcd over TLS with client certificates: agents and the CLI connect with the mesh's own PKI (warren-mesh certs),
and every way the credentials can be wrong ends in one line that names the flag to fix."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import run
from integration.agents import Mesh
from warren_mesh.identity import pki
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.testkit.etcd_server import EtcdServer


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    result = subprocess.run(
        [sys.executable, "-m", "warren_mesh.cli", "certs", "init", "--dir", str(directory), "--etcd-name", "127.0.0.1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote" in result.stdout and "PRIVATE KEY" not in result.stdout + result.stderr
    for node in ("n0", "n1"):
        subprocess.run(
            [sys.executable, "-m", "warren_mesh.cli", "certs", "node", node, "--dir", str(directory)],
            capture_output=True,
            check=True,
        )
    return directory


@pytest.fixture(scope="module")
def tls_etcd(pki_dir: Path) -> Iterator[EtcdServer]:
    with EtcdServer(pki=pki_dir) as server:
        yield server


def _status(etcd: str, prefix: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "status",
            f"--etcd-endpoints={etcd}",
            f"--prefix={prefix}",
            "--output=json",
            "--agent-metrics=",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_agents_and_status_speak_tls_with_client_certificates(
    tls_etcd: EtcdServer, pki_dir: Path, prefix: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        mesh = Mesh(tls_etcd.endpoint, prefix, tmp_path)
        try:
            for node in ("n0", "n1"):
                tls = EtcdTls(pki_dir / "ca.pem", pki_dir / f"node-{node}.pem", pki_dir / f"node-{node}-key.pem")
                mesh.start(node, tls=tls)
            await mesh.converged()
        finally:
            await mesh.close()

    run(scenario())
    # The nodes left; their records with them. A third node's status through the admin certificate:
    ok = _status(
        tls_etcd.endpoint,
        prefix,
        f"--etcd-ca-file={pki_dir / 'ca.pem'}",
        f"--etcd-cert-file={pki_dir / 'admin.pem'}",
        f"--etcd-key-file={pki_dir / 'admin-key.pem'}",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no client certificate", "refused this client's certificate"),
        ("a client certificate of another CA", "refused this client's certificate"),
        ("etcd's certificate from another CA", "not signed by the CA in --etcd-ca-file"),
        ("plain http", "if etcd serves TLS, give an https:// endpoint"),
        ("an expired certificate", "expired on"),
        ("a key of another certificate", "is not the key of"),
        ("a certificate without its key", "go together"),
        ("TLS files with an http endpoint", "is plain http"),
    ],
)
def test_wrong_credentials_end_in_one_line_naming_the_fix(
    tls_etcd: EtcdServer, pki_dir: Path, tmp_path: Path, case: str, message: str
) -> None:
    ca, cert, key = pki_dir / "ca.pem", pki_dir / "node-n0.pem", pki_dir / "node-n0-key.pem"
    endpoint = tls_etcd.endpoint
    other = tmp_path / "other"
    pki.init(other, ["127.0.0.1"])
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    old = pki.issue(other, "old", "node-old", not_before=past, days=1)
    flags = {
        "no client certificate": [f"--etcd-ca-file={ca}"],
        "a client certificate of another CA": [
            f"--etcd-ca-file={ca}",
            f"--etcd-cert-file={other / 'admin.pem'}",
            f"--etcd-key-file={other / 'admin-key.pem'}",
        ],
        "etcd's certificate from another CA": [
            f"--etcd-ca-file={other / 'ca.pem'}",
            f"--etcd-cert-file={cert}",
            f"--etcd-key-file={key}",
        ],
        "plain http": [],
        "an expired certificate": [
            f"--etcd-ca-file={ca}",
            f"--etcd-cert-file={old.cert}",
            f"--etcd-key-file={old.key}",
        ],
        "a key of another certificate": [
            f"--etcd-ca-file={ca}",
            f"--etcd-cert-file={cert}",
            f"--etcd-key-file={pki_dir / 'admin-key.pem'}",
        ],
        "a certificate without its key": [f"--etcd-ca-file={ca}", f"--etcd-cert-file={cert}"],
        "TLS files with an http endpoint": [f"--etcd-ca-file={ca}"],
    }[case]
    if case in ("plain http", "TLS files with an http endpoint"):
        endpoint = endpoint.replace("https://", "http://")
    result = _status(endpoint, "/tls-errors", *flags)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("warren-mesh: error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
