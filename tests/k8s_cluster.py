"""The operator tests' handles on a real API server and a real operator process (fixtures: k8s/conftest.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warren_mesh.process import stop_child
from warren_mesh.testkit.etcd_server import free_port

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_COMMAND = (sys.executable, "-m", "warren_mesh.cli", "operator")
# Debian 13's kubectl (1.32), which hack/setup unpacks and links into the venv: the suite never depends on a kubectl
# that a machine happens to carry (Debian 12's 1.20 has no `create token`, and its kustomize cannot build deploy/).
KUBECTL = str(Path(sys.executable).parent / "kubectl")


@dataclass
class Cluster:
    state: Path

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def run_kubectl(
        self, *args: str, input: str | None = None, as_: str = "admin", cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        config = self.kubeconfig if as_ == "admin" else self.state / f"kubeconfig-{as_}"
        return subprocess.run(
            [KUBECTL, f"--kubeconfig={config}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            cwd=cwd,
        )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, as_: str = "admin", cwd: Path | None = None
    ) -> str:
        result = self.run_kubectl(*args, input=input, as_=as_, cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr if not check else result.stdout

    def get(self, kind: str, name: str | None = None, *, namespace: str | None = None) -> Any:
        """The object (or the list, without ``name``) as JSON; None only when the API server says NotFound.

        Any other failure (an API server that does not answer, a kind it does not know, output that is not JSON)
        raises: an absence check ("the node is gone") must not pass because the question could not be asked.
        """
        where = [f"--namespace={namespace}"] if namespace else []
        argv = ["get", kind, *([name] if name else []), *where, "-o", "json"]
        result = self.run_kubectl(*argv)
        if result.returncode != 0:
            if name is not None and "(NotFound)" in result.stderr:
                return None
            raise AssertionError(f"kubectl {' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        try:
            return json.loads(result.stdout)
        except ValueError as exc:
            raise AssertionError(f"kubectl {' '.join(argv)} printed no JSON ({exc}): {result.stdout[:300]!r}") from exc


def readme_secret_commands() -> list[list[str]]:
    """deploy/README.md's certificate and Secret commands (the block after ``<!-- secrets:``), each split as a shell
    would: what a user runs before ``kubectl apply -k deploy/``."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    block = readme.split("<!-- secrets:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.strip().splitlines()]


class OperatorProcess:
    """`warren-mesh operator` as a real process, logged in as the operator's service account."""

    def __init__(self, cluster: Cluster, etcd_flags: list[str], log_path: Path) -> None:
        """``etcd_flags``: ``--etcd-endpoints`` and the operator's credentials (EtcdServer.client_flags)."""
        self.cluster = cluster
        self.etcd_flags = etcd_flags
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.cluster.state / "kubeconfig-operator"))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *OPERATOR_COMMAND,
                    *self.etcd_flags,
                    f"--health-address=127.0.0.1:{free_port()}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process, timeout=15)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]
