#!/usr/bin/env python3
"""Make the benchmark tables of docs/ from the results files in docs/results (hack/results.py).

    .venv/bin/python hack/bench_report.py           rewrite every generated table in DOCS
    .venv/bin/python hack/bench_report.py --check   exit 1 if a table differs from what the files give (the tests)

A generated table sits between ``<!-- results: NAME -->`` and ``<!-- /results -->``; NAME says which (``control``:
the newest bench run of each scenario; ``dataplane``: every throughput run; a scenario's name, e.g. ``rotate``:
the newest run of that scenario at each size). Each row names its results file, and the file has the command and
the machine: every figure in a table can be traced to the run that measured it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import results

DOCS = (
    results.ROOT / "docs" / "benchmarks.md",
    results.ROOT / "docs" / "key-rotation.md",
    results.ROOT / "docs" / "topology.md",
)
BLOCK = re.compile(r"(<!-- results: (\w+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)

# scenario -> the keys shown for it, in order (the rest stay in the file)
CONTROL_KEYS = {
    "floor": ("nodes", "client", "p50_ms", "p99_ms", "max_ms", "samples", "etcd_cpu_s", "etcd_rss_mb"),
    "join": (
        "nodes",
        "locations",
        "etcd_auth",
        "p50_ms",
        "p99_ms",
        "floor_p99_ms",
        "p99_vs_floor",
        "pod_reachable_p99_ms",
    ),
    "leave": ("nodes", "graceful_p50_ms", "graceful_p99_ms", "ttl_s", "detect_minus_ttl_s"),
    "storm": (
        "nodes",
        "lease_ttl_s",
        "converged_s",
        "worst_loop_lag_s",
        "agents_cpu_us_per_record",
        "reregistrations",
        "watch_restarts",
    ),
    "coldstart": ("records", "ready_s", "userspace_ready_s", "userspace_daemon_start_s"),
    "churn": ("nodes", "operations", "converged_s", "final_state_matches", "untouched_changes"),
    "cost": (
        "records",
        "locations",
        "cpu_ms_per_join",
        "cpu_ms_per_leave",
        "cpu_per_event_vs_smallest",
        "idle_cpu_percent",
        "rss_mb_per_1000_peers",
        "resync_ms",
        "ready_s",
    ),
    "flood": ("nodes", "writes_per_s", "agent_cpu_us_per_write", "join_p50_ms", "join_max_ms", "floor_ms"),
    "idle": (
        "nodes",
        "window_s",
        "revisions",
        "puts",
        "deletes",
        "keepalives_per_s",
        "keepalives_expected_per_s",
        "agent_idle_cpu_ms_per_s",
        "etcd_cpu_percent",
        "etcd_rss_mb",
    ),
    "scrape": ("peers", "memory_scrape_p50_ms", "userspace_scrape_p50_ms", "memory_exposition_kb"),
    "rotate": ("nodes", "rate", "rotations", "max_gap_ms", "worst_pair_loss", "untouched_changes", "rotation_s_p50"),
    "failover": (
        "rounds",
        "lease_ttl_ms",
        "give_up_bound_ms",
        "wan_cut_gap_ms_p50",
        "wan_cut_gap_ms_max",
        "node_death_gap_ms",
    ),
}
DATAPLANE_KEYS = (
    "native_gbps",
    "manual_wg_gbps",
    "mesh_gbps",
    "pod_gbps",
    "tunnel_vs_native",
    "tunnel_vs_ceiling",
    "pod_vs_tunnel",
    "mesh_vs_manual",
)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _source(path: Path, document: dict[str, Any]) -> str:
    machine = document["machine"]
    # What the figures of each tool depend on besides the CPUs: etcd for the control plane, the kernel for the data.
    extra = f"etcd {machine.get('etcd') or '?'}" if document["tool"] == "bench" else f"kernel {machine['kernel']}"
    # The model too: runs of one table came from more than one kind of machine (an Intel Xeon, then an AMD EPYC).
    model = str(machine.get("cpu_model") or "?").replace("(R)", "").replace(" Processor", "")
    return f"[{path.stem}](results/{path.name}) ({machine['cpus']} CPUs {model}, {extra})"


def control_table(files: list[tuple[Path, dict[str, Any]]], only: str | None = None) -> str:
    """The newest line of each scenario (and each node count: a scale run does not hide the N=100 one);
    ``only``: of that scenario alone."""
    newest: dict[tuple[str, Any, Any, Any, Any], tuple[Path, dict[str, Any], dict[str, Any]]] = {}
    for path, document in files:
        if document["tool"] != "bench":
            continue
        for line in document["results"]:
            if only is not None and line["scenario"] != only:
                continue
            size = line.get("nodes", line.get("records", line.get("peers")))
            # A located run (join --locations) does not hide the flat one of its size, nor a floor on another
            # client the etcd3 one.
            kind = (line.get("etcd_auth"), line.get("locations") or None, line.get("client"))
            newest[(line["scenario"], size, *kind)] = (
                path,
                document,
                line,
            )
    rows = ["| scenario | figures | run |", "| --- | --- | --- |"]
    order = list(CONTROL_KEYS)
    for key in sorted(
        newest,
        key=lambda k: (
            order.index(k[0]) if k[0] in order else 99,
            k[1] if isinstance(k[1], int) else -1,  # sizes in numeric order
            str(k[2]),
            k[3] or 0,  # a flat mesh before the located ones of its size
            str(k[4]),
        ),
    ):
        path, document, line = newest[key]
        shown = CONTROL_KEYS.get(line["scenario"], ())
        figures = ", ".join(f"{name} {_cell(line.get(name))}" for name in shown if name in line)
        rows.append(f"| {line['scenario']} | {figures} | {_source(path, document)} |")
    return "\n".join(rows) + "\n"


def dataplane_table(files: list[tuple[Path, dict[str, Any]]]) -> str:
    """Every throughput run, each wireguard-go binary of it on a row of its own (the first is the mesh's)."""
    rows = [
        "| link | wireguard-go | " + " | ".join(DATAPLANE_KEYS) + " | run |",
        "| --- | --- | " + " | ".join("---" for _ in DATAPLANE_KEYS) + " | --- |",
    ]
    for path, document in files:
        if document["tool"] != "throughput":
            continue
        for result in document["results"]:
            for run in [result, *result.get("others", [])]:
                figures = " | ".join(_cell(run.get(key)) for key in DATAPLANE_KEYS)
                link = result["link_rate"] + (" over IPv6" if result.get("underlay") == "ipv6" else "")
                rows.append(f"| {link} | {run['wireguard_go_version']} | {figures} | {_source(path, document)} |")
    return "\n".join(rows) + "\n"


TABLES: dict[str, Callable[[list[tuple[Path, dict[str, Any]]]], str]] = {
    "control": control_table,
    "dataplane": dataplane_table,
}


def render(text: str, files: list[tuple[Path, dict[str, Any]]]) -> str:
    def table(match: re.Match[str]) -> str:
        name = match.group(2)
        if name in TABLES:
            return match.group(1) + TABLES[name](files) + match.group(4)
        if name in CONTROL_KEYS:
            return match.group(1) + control_table(files, only=name) + match.group(4)
        known = ", ".join([*TABLES, *CONTROL_KEYS])
        raise SystemExit(f"bench_report: a doc names a table {name!r}; known: {known}")

    return BLOCK.sub(table, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say whether docs/benchmarks.md is up to date")
    args = parser.parse_args()
    files = results.load()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        made = render(text, files)
        if made != text:
            stale.append(doc.name)
            if not args.check:
                doc.write_text(made)
    if args.check and stale:
        print(f"the tables of {', '.join(stale)} differ from docs/results: run hack/bench_report.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
