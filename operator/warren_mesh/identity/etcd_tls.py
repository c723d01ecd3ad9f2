"""How a client proves itself to etcd and checks etcd in turn: a CA to verify etcd's certificate, and a client
certificate and key whose common name is the etcd user it logs in as (``--etcd-ca-file``, ``--etcd-cert-file``,
``--etcd-key-file``). A value of the bottom floor: settings build it, the store uses it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EtcdTls:
    ca_file: Path | None  # None: the system's trusted authorities
    cert_file: Path | None  # None (with key_file): no client certificate
    key_file: Path | None

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """(modification time, size) of each file: changes when a file is replaced (a renewed certificate)."""
        stamps = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            try:
                info = path.stat() if path is not None else None
            except OSError:
                info = None
            stamps.append((info.st_mtime_ns, info.st_size) if info is not None else (0, 0))
        return tuple(stamps)

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate chain) as bytes, as gRPC takes them; OSError names a file that cannot be read."""

        def read(path: Path | None) -> bytes | None:
            return None if path is None else path.read_bytes()

        return read(self.ca_file), read(self.key_file), read(self.cert_file)
