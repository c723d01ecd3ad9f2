"""A real Prometheus (Debian's package) for the monitoring tests: started with a config of the test's, on
loopback of a network namespace of the test's (or of this machine), queried through its HTTP API."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from pyroute2 import netns as pyroute2_netns

from warren_mesh.process import in_netns, stop_child
from warren_mesh.testkit.waiting import TimedOut, wait_for

PORT = 9090


def http_get(host: str, port: int, path: str, *, netns: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET over a socket made inside ``netns`` (None: ours): the lab's addresses are only reachable from there."""
    sock = pyroute2_netns.create_socket(netns) if netns else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.sock = sock
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()


class Prometheus:
    def __init__(self, config: dict[str, Any], workdir: Path, *, netns: str | None = None) -> None:
        self.workdir = workdir
        self.netns = netns
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{PORT}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=in_netns(self.netns, tied_to_parent=True),  # noqa: PLW1509 (one setns call)
            )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise TimedOut("Prometheus exited")
            with contextlib.suppress(OSError):
                return http_get("127.0.0.1", PORT, "/-/ready", netns=self.netns)[0] == 200
            return False

        try:
            wait_for(ready, timeout, "Prometheus to be ready", interval=0.2)
        except TimedOut as exc:
            self.stop()
            raise RuntimeError(
                f"Prometheus did not start ({exc}); its log:\n{self.log_path.read_text()[-3000:]}"
            ) from None

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        status, body = http_get("127.0.0.1", PORT, f"/api/v1/{path}?{query}", netns=self.netns)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"Prometheus answered {status} to {path} {params}: {body[:500]!r}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [
            alert
            for alert in self.api("alerts")["alerts"]
            if alert["labels"].get("alertname") == alertname and alert["state"] == "firing"
        ]
