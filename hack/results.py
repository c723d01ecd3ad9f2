"""Benchmark results files: every run of hack/bench.py and hack/throughput.py leaves one, and docs/ is made from them.

A results file (docs/results/<UTC time>-<tool>.json) holds what a reader needs to trust a figure: the command as
it was run, the date, the machine (CPUs, model, memory, kernel, Python, etcd and wireguard-go versions) and every
JSON line the run printed. hack/bench_report.py renders docs/benchmarks.md's tables from these files, each row
naming the file it came from, so no figure in docs/ is copied by hand.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "docs" / "results"


def _version(argv: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, out)
    return match.group(1) if match else None


@functools.cache
def machine() -> dict[str, Any]:
    """What the figures depend on: the same keys for every tool, so runs compare."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        memory_kb = 0
    etcd = os.environ.get("WARREN_MESH_ETCD") or shutil.which("etcd") or "/usr/bin/etcd"
    wireguard_go = shutil.which("wireguard-go") or "/usr/bin/wireguard-go"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "etcd": _version([etcd, "--version"], r"etcd Version: (\S+)"),
        "wireguard_go": _version([wireguard_go, "--version"], r"wireguard-go v(\S+)"),
    }


def save(tool: str, lines: list[dict[str, Any]], directory: Path = DEFAULT_DIR) -> Path:
    """Write one run's results file; its path. ``tool``: bench or throughput."""
    now = datetime.datetime.now(datetime.UTC)
    command = " ".join([f"hack/{tool}.py", *sys.argv[1:]])
    document = {
        "tool": tool,
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "results": lines,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{now.strftime('%Y%m%dT%H%M%SZ')}-{tool}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load(directory: Path = DEFAULT_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """Every results file, oldest first (the names sort by time)."""
    return [(path, json.loads(path.read_text())) for path in sorted(directory.glob("*.json"))]
