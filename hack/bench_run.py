"""What every benchmark scenario shares: how latencies are summarised, and what a run was asked for."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BenchRun:
    """One run of hack/bench.py: the etcd its scenarios use, the flags, and (--etcd-auth) the run's PKI."""

    endpoint: str
    args: argparse.Namespace
    pki_dir: Path | None = None


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "max_ms": round(ordered[-1], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "samples": len(ordered),
    }


class BenchError(Exception):
    """A condition was not reached in time, or a worker failed."""


def proc_usage(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process, from /proc. CPU is the sum of its threads' run time in nanoseconds
    (schedstat): the tick-based counters of /proc/PID/stat count in 10 ms steps, coarser than a small run."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    cpu_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            cpu_ns += int((task / "schedstat").read_text().split()[0])
    return rss, cpu_ns / 1e9
