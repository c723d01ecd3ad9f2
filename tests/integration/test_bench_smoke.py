"""hack/bench.py stays runnable: a tiny run of every scenario must print well-formed JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warren_mesh.testkit.etcd_server import EtcdServer

BENCH = Path(__file__).resolve().parents[2] / "hack" / "bench.py"


def test_bench_smoke(etcd: EtcdServer, tmp_path: Path) -> None:
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
            "--leaves",
            "1",
            "--ttl",
            "2",
            "--records",
            "20",
            "--sizes",
            "20",
            "--events",
            "5",
            "--peers",
            "20",
            "--scrapes",
            "2",
            "--churn",
            "4",
            "--flood-seconds",
            "2",
            "--pod-rounds",
            "1",
            "--etcd-endpoints",
            etcd.endpoint,
            "--results",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    lines = {line["scenario"]: line for line in printed}
    # The run's results file holds every line it printed, the command and the machine (docs/ is made from these).
    (saved,) = tmp_path.glob("*-bench.json")
    document = json.loads(saved.read_text())
    assert document["results"] == printed and document["command"].startswith("hack/bench.py --scenario all")
    assert document["machine"]["etcd"] and document["machine"]["cpus"] == os.cpu_count()
    assert list(lines) == ["floor", "join", "leave", "storm", "coldstart", "churn", "cost", "flood", "scrape"]
    floor, join, leave, cold = lines["floor"], lines["join"], lines["leave"], lines["coldstart"]
    assert floor["samples"] == 3 * 5
    assert join["samples"] == 3 + 4  # each join is seen by every agent already there
    assert 0 < floor["p50_ms"] <= floor["p99_ms"] <= floor["max_ms"]
    assert 0 < join["p50_ms"] <= join["p99_ms"] and join["floor_p99_ms"] == floor["p99_ms"]
    if os.geteuid() == 0:  # a third node joins a userspace lab: its pod is reached from the others' pods
        assert join["pod_samples"] == 2 and 0 < join["pod_reachable_p50_ms"] <= join["pod_reachable_p99_ms"]
    assert 0 < leave["graceful_p50_ms"] <= leave["graceful_max_ms"]
    assert leave["ttl_s"] == 2 and leave["detect_s"] >= 1.0  # a crash is noticed through the lease, not earlier
    assert cold["records"] == 20 and cold["ready_s"] > 0
    if os.geteuid() == 0:  # also a real agent on wireguard-go, its device in a namespace of its own
        assert cold["userspace_ready_s"] > 0
    storm = lines["storm"]
    assert storm["nodes"] == 3 and storm["converged_s"] > 0 and storm["passes_per_agent"] >= 1
    # Three agents on an idle etcd: none may lose its lease (re-register) or its watch, and none may wait for its
    # turn as long as its lease lives (a lag that long is an agent that would have lost it).
    assert storm["reregistrations"] == 0 and storm["watch_restarts"] == 0, storm
    assert 0 <= storm["worst_loop_lag_s"] < storm["lease_ttl_s"], storm
    churn = lines["churn"]
    assert churn["operations"] == 4 and churn["final_state_matches"] is True and churn["untouched_changes"] == 0
    cost = lines["cost"]
    assert cost["records"] == 20 and cost["events"] == 5 and cost["rss_mb"] > 0 and cost["resync_ms"] > 0
    assert cost["cpu_ms_per_join"] > 0 and cost["cpu_ms_per_leave"] > 0 and cost["cpu_per_event_vs_smallest"] == 1.0
    flood = lines["flood"]
    assert flood["nodes"] == 3 and flood["writes_per_s"] > 0 and flood["agent_cpu_us_per_write"] > 0, flood
    assert 0 < flood["join_p50_ms"] <= flood["join_max_ms"] and flood["floor_ms"] > 0, flood
    scrape = lines["scrape"]
    assert scrape["peers"] == 20 and scrape["memory_scrape_p50_ms"] > 0 and scrape["memory_exposition_kb"] > 0


def test_an_idle_mesh_writes_nothing(etcd: EtcdServer) -> None:
    """The idle scenario, small: three agents settled and left alone write nothing to etcd (observations,
    endpoints, claims, timestamps: nothing republished without a change), by etcd's own counters and a watch of
    the mesh's keys; their leases are refreshed, and nothing else."""
    args = [sys.executable, str(BENCH), "--scenario", "idle", "--nodes", "3", "--lease-ttl", "3"]
    args += ["--idle-seconds", "6", "--etcd-endpoints", etcd.endpoint, "--results", ""]
    result = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (idle,) = map(json.loads, result.stdout.splitlines())
    assert idle["scenario"] == "idle" and idle["window_s"] >= 6
    assert (idle["revisions"], idle["puts"], idle["deletes"], idle["written"]) == (0, 0, 0, {}), idle
    assert idle["leases_granted"] == 0 and idle["keepalives_per_s"] > 0, idle


def test_bench_with_etcd_auth_smoke() -> None:
    """The join scenario on etcd with TLS and per-node roles (its own etcd): what docs/benchmarks.md compares."""
    args = [
        sys.executable,
        str(BENCH),
        "--scenario",
        "join",
        "--nodes",
        "3",
        "--joins",
        "2",
        "--pod-rounds",
        "0",
        "--results",
        "",
    ]
    result = subprocess.run([*args, "--etcd-auth"], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (join,) = map(json.loads, result.stdout.splitlines())
    assert join["scenario"] == "join" and join["etcd_auth"] is True and join["floor_p99_ms"] > 0
    assert join["samples"] == 3 + 4 and 0 < join["p50_ms"] <= join["p99_ms"]


def test_bench_join_in_locations_smoke() -> None:
    """The join scenario in a located mesh (docs/topology.md): 4 nodes in 2 locations, 2 joiners; every other agent
    routes each joiner, to it or to its gateway."""
    args = [sys.executable, str(BENCH), "--scenario", "join", "--nodes", "4", "--joins", "2", "--locations", "2"]
    result = subprocess.run(
        [*args, "--pod-rounds", "0", "--results", ""], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (join,) = map(json.loads, result.stdout.splitlines())
    assert join["scenario"] == "join" and join["locations"] == 2 and join["floor_p99_ms"] > 0
    assert join["samples"] == 4 + 5 and 0 < join["p50_ms"] <= join["p99_ms"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the rotate scenario runs a userspace lab (root)")
def test_bench_rotate_smoke() -> None:
    """Every node of a 3-node lab rotates its key under probe traffic (docs/key-rotation.md's measurement, small).
    Only the shape and what must hold whatever the machine: every rotation done, nobody else touched."""
    args = [sys.executable, str(BENCH), "--scenario", "rotate", "--nodes", "3", "--probe-rate", "100", "--results", ""]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (rotate,) = map(json.loads, result.stdout.splitlines())
    assert rotate["scenario"] == "rotate" and rotate["rotations"] == 3 and rotate["pairs"] == 6
    assert rotate["untouched_changes"] == 0 and rotate["max_gap_ms"] > 0
    # A rotation that fell back on WireGuard's own recovery (a handshake retried after 5 s) shows a gap of 5 s or
    # more and loses about a tenth of a pair's datagrams over this run; the design loses next to none.
    assert rotate["max_gap_ms"] < 5000 and rotate["worst_pair_loss"] < 0.05, rotate
