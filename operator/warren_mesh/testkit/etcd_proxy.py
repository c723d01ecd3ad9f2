"""etcd's own gRPC proxy in front of a plain etcd of ours (`etcd grpc-proxy start`, in the etcd binary we run).

What a large cluster puts between its agents and etcd: agents watching the same prefix cost etcd a few
coalesced watchers instead of one each. Loopback only, free ports; it owns its data directory and removes it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from warren_mesh.process import stop_child
from warren_mesh.testkit.etcd_server import EtcdServer, EtcdServerError, find_etcd, free_port
from warren_mesh.testkit.exposition import scrape


class EtcdGrpcProxy:
    def __init__(self, etcd: EtcdServer) -> None:
        if etcd.pki is not None:
            raise EtcdServerError("the proxy helper fronts a plain etcd (its TLS flags are not wired here)")
        self._etcd = etcd
        self.port, self.metrics_port = free_port(), free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="warren-etcd-proxy-"))
        self.log_path = self._dir / "proxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        args = [
            find_etcd(),
            "grpc-proxy",
            "start",
            f"--endpoints={self._etcd.endpoint.removeprefix('http://')}",
            f"--listen-addr=127.0.0.1:{self.port}",
            f"--advertise-client-url=127.0.0.1:{self.port}",
            f"--metrics-addr=http://127.0.0.1:{self.metrics_port}",
            f"--data-dir={self._dir / 'data'}",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.metrics():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise EtcdServerError(f"etcd grpc-proxy did not start; see {self.log_path}")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """The proxy's own metrics (etcd_grpc_proxy_*); {} while it is not answering."""
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics", prefix="etcd_grpc_proxy")

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_child(process)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EtcdGrpcProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
