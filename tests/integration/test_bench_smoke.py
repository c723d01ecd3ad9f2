"""hack/bench.py stays runnable: a tiny run of every scenario must print well-formed JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from warren_mesh.lab.etcd_server import EtcdServer

BENCH = Path(__file__).resolve().parents[2] / "hack" / "bench.py"


def test_bench_smoke(shared_etcd: EtcdServer) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--scenario",
            "all",
            "--nodes",
            "3",
            "--joins",
            "2",
            "--puts",
            "5",
            "--etcd-endpoints",
            shared_etcd.endpoint,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["scenario"] for line in lines] == ["floor", "join"]
    floor, join = lines
    assert floor["samples"] == 3 * 5
    assert join["samples"] == 3 + 4  # each join is seen by every agent already there
    assert 0 < floor["p50_ms"] <= floor["p99_ms"] <= floor["max_ms"]
    assert 0 < join["p50_ms"] <= join["p99_ms"] and join["floor_p99_ms"] == floor["p99_ms"]
