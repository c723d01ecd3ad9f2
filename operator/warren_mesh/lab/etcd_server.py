"""A real etcd process of our own: the embedded default for the demo and lab, and the fixture of the tests.

It listens on loopback only, on free ports, with a data directory it owns and removes. Progress notifications
are turned on at a short interval so watchers can tell a quiet stream from a dead one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from warren_mesh.process import die_with_parent


class EtcdServerError(RuntimeError):
    pass


def find_etcd() -> str:
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EtcdServerError("etcd is not installed; `apt-get install etcd-server` (./hack/test does it for you)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: Path | None = None, *, progress_interval: str = "1s") -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="warren-etcd-")) if data_dir is None else data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self._progress_interval = progress_interval
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 20.0) -> None:
        if self._process is not None:
            return
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            find_etcd(),
            "--name=default",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            f"--experimental-watch-progress-notify-interval={self._progress_interval}",
            "--log-level=warn",
        ]
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (one prctl)
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise EtcdServerError(f"etcd exited at start; see {self.log_path}:\n{self._tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdServerError(f"etcd did not become healthy within {timeout} s; see {self.log_path}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:  # noqa: S310 (loopback)
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports and data (clients resume where they were)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open but nothing answers, as with a hung server."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
