"""How a command reaches a lab's etcd: its endpoint and, when it speaks TLS (the default), the admin's or a node's
certificate from the lab's own PKI. `warren-mesh lab env` prints it; the lab's agents and the tests use it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from warren_mesh.identity import pki


@dataclass(frozen=True, slots=True)
class LabAccess:
    endpoint: str
    pki_dir: Path | None  # None: plain http, no certificates

    def env(self, node: str | None = None) -> dict[str, str]:
        """The WARREN_MESH_* settings for a command acting as the admin, or as ``node``."""
        env = {"WARREN_MESH_ETCD_ENDPOINTS": self.endpoint}
        if self.pki_dir is not None:
            stem = "admin" if node is None else pki.node_user(node)
            env["WARREN_MESH_ETCD_CA_FILE"] = str(self.pki_dir / "ca.pem")
            env["WARREN_MESH_ETCD_CERT_FILE"] = str(self.pki_dir / f"{stem}.pem")
            env["WARREN_MESH_ETCD_KEY_FILE"] = str(self.pki_dir / f"{stem}-key.pem")
        return env

    def flags(self, node: str | None = None) -> list[str]:
        """The same as command-line flags."""
        return [f"--{k.removeprefix('WARREN_MESH_').lower().replace('_', '-')}={v}" for k, v in self.env(node).items()]

    def exports(self, node: str | None = None) -> str:
        """Shell ``export`` lines, for ``eval "$(warren-mesh lab env)"``."""
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.env(node).items())

    def etcdctl(self, *args: str) -> list[str]:
        """etcdctl as the admin (run it inside the hub's namespace, where etcd listens)."""
        argv = ["etcdctl", f"--endpoints={self.endpoint}"]
        if self.pki_dir is not None:
            directory = self.pki_dir
            argv += [f"--cacert={directory / 'ca.pem'}", f"--cert={directory / 'admin.pem'}"]
            argv += [f"--key={directory / 'admin-key.pem'}"]
        return [*argv, *args]
