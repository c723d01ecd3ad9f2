"""hack/throughput.py stays runnable: a short run must print its JSON line with every figure measured.

The ratio itself (mesh_vs_manual >= 0.95) is a benchmark result reported with the machine in the notes, not
asserted here: one-second iperf3 runs on a shared 2-core CI machine are too noisy to judge a 5 % margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "throughput.py"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="throughput.py creates network namespaces (root)")


def test_throughput_smoke() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("native_gbps", "manual_wg_gbps", "mesh_gbps", "pod_gbps", "mesh_vs_manual", "tunnel_vs_native"):
        assert result[key] > 0, key
    assert result["native_gbps"] > result["mesh_gbps"]
    assert result["ceiling_ratio"] == 0.958 and result["mtu"] == {"underlay": 1500, "tunnel": 1420}
    assert result["link_rate"] == "unlimited" and result["wireguard_go_version"].startswith("0.0.")
