"""The operator tests' handles on a real API server and a real operator process (fixtures: k8s/conftest.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warren_mesh.lab.etcd_server import free_port

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_COMMAND = (sys.executable, "-m", "warren_mesh.cli", "operator")


@dataclass
class Cluster:
    state: Path

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, as_: str = "admin", cwd: Path | None = None
    ) -> str:
        config = self.kubeconfig if as_ == "admin" else self.state / f"kubeconfig-{as_}"
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={config}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            cwd=cwd,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr if not check else result.stdout

    def get(self, kind: str, name: str | None = None, *, namespace: str | None = None) -> Any:
        where = [f"--namespace={namespace}"] if namespace else []
        out = self.kubectl("get", kind, *([name] if name else []), *where, "-o", "json", check=False)
        try:
            return json.loads(out)
        except ValueError:
            return None


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
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def wait_for(condition: Any, timeout: float, what: str, log: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n--- what there is to see ---\n{log()}" if log is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(0.2)
