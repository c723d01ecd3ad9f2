#!/usr/bin/env python3
"""Benchmarks of the control plane against a real etcd, each judged against a floor measured in the same run.

    .venv/bin/python hack/bench.py --scenario floor --scenario join --nodes 10
    .venv/bin/python hack/bench.py --scenario join --nodes 100 --etcd-auth   # TLS, client certificates, roles

Scenarios (one JSON line each, latencies in milliseconds):
  floor  N watchers on the etcd3 client alone (no agent logic): put -> watch callback latency.
  join   N agents (real agent code, memory backend) settled; M more join one at a time; latency from the joining
         node's publish time to each other agent's device change for it. As root also, in --pod-rounds fresh
         userspace labs, a third node joining two: its publish time until each other node's pod reaches a pod on
         it (pod_reachable_p50_ms, pod_reachable_p99_ms; pod_started_ms: until its pod was attached). With
         --locations K the nodes are spread over K locations, a gateway each (docs/topology.md): latency until each
         agent routes the joiner, to it or to the gateway that carries it.
  leave  graceful leaves (lease revoked): time to removal on every other agent (graceful_*_ms); one crash (an
         agent process SIGKILLed, its lease runs out): time until every agent removed it (detect_s, and
         detect_minus_ttl_s against the lease TTL).
  storm  N agents start at once: seconds until every agent has N-1 peers (converged_s); also what it took:
         reconcile passes per agent, watch restarts (reason "behind": a watch resumed to catch up in batches) and
         re-registrations (each one a lease that was lost).
  coldstart  one agent starting next to N existing records: seconds to a fully configured device (ready_s; as
         root also userspace_ready_s: a real agent on wireguard-go, daemon start included, device in a namespace;
         of that, userspace_daemon_start_s, and userspace_set_peers_s: the first pass's one UAPI transaction alone,
         with the mesh's keepalive and without: wireguard-go starts a handshake with each peer inside the call).
  churn  --churn random joins/graceful leaves on a settled mesh of N: afterwards every device must equal etcd
         (final_state_matches) and no agent may have touched a peer that did not change (untouched_changes).
  cost   one real agent process (memory device) beside each of --sizes records: CPU ms per applied join and per
         leave (--events of each, one at a time, its idle CPU taken out), its idle CPU, RSS MB per 1000 peers (over
         an agent with none), one full resync (resync_ms), and cpu_per_event_vs_smallest (flat is 1.0). With
         --locations K the records are spread over K locations, a gateway each, the agent in the first.
  flood  one node's record rewritten as fast as etcd takes it for --flood-seconds beside N settled agents, a node
         joining halfway: writes a second, each agent's CPU per flood write (agent_cpu_us_per_write), the join's
         lag to the agents (join_p50_ms, join_max_ms) against a bare watcher's in the same run (floor_ms).
  idle   (not in "all") N simulated agents settled, nothing changing, for --idle-seconds: what etcd was asked to
         do, from its own counters (revisions, puts, deletes: must be 0; lease keepalives a second against
         N / (TTL / 3)), writes by kind of key (written), etcd's CPU and memory, each idle agent's CPU.
  scrape one /metrics scrape of an agent whose device has --peers peers (memory device; also wireguard-go in a
         namespace of its own when root): wall and CPU milliseconds per scrape, exposition size.
  rotate (root; not in "all") a userspace lab of N nodes, every pair exchanging --probe-rate datagrams a second;
         every node rotates its WireGuard key in turn (warren-mesh rotate-key): the worst pair's loss
         (worst_pair_loss, worst_pair_lost_ms) and longest gap (max_gap_ms), and the changes peers of nodes not
         rotating saw (untouched_changes, should be 0).
  failover (root; not in "all") a userspace lab of two locations (docs/topology.md), a 50/s probe between a node
         of each that has no WAN link: --rounds times location a's gateway loses its WAN link (node and agent
         healthy) and gets it back, then its node dies; the probe's longest gap for each (wan_cut_gap_ms_*,
         node_death_gap_ms) against the run's floors: the lease TTL (--ttl) and the give-up bound.

The agents are packed into --workers processes (default: one per core; hack/agent_pool.py), each running its
share on one event loop, so per-event figures include the other agents' work: on a 2-core machine the honest
reading is "what every agent's device did", not an isolated single agent. The floor's bare watchers are packed
the same way. The workers run at nice 5 so that etcd, which has CPUs of its own in a cluster, is not starved by
the simulated agents sharing its machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

import results
from bench_agent import scenario_coldstart, scenario_scrape
from bench_lab import pod_reachability, scenario_failover, scenario_rotate
from bench_mesh import scenario_churn, scenario_flood, scenario_floor, scenario_join, scenario_leave, scenario_storm
from bench_run import BenchError, BenchRun
from bench_scale import etcd_usage, scenario_cost, scenario_idle
from warren_mesh.identity import pki
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import TimedOut


@dataclass(frozen=True, slots=True)
class Scenario:
    run: Callable[[BenchRun], dict[str, Any] | list[dict[str, Any]]]  # a list: a line for each size
    in_all: bool = True  # part of --scenario all


def _join(run: BenchRun) -> dict[str, Any]:
    args = run.args
    result = asyncio.run(
        scenario_join(
            run.endpoint,
            args.nodes,
            args.joins,
            args.workers,
            args.lease_ttl,
            pki_dir=run.pki_dir,
            locations=args.locations,
        )
    )
    if os.geteuid() == 0 and args.pod_rounds > 0:  # the lab drives netlink with an event loop of its own
        result.update(pod_reachability(args.pod_rounds))
    return result


def _rotate(run: BenchRun) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("the rotate scenario runs a userspace lab: run it as root")
    return scenario_rotate(run.args.nodes, run.args.probe_rate)


def _failover(run: BenchRun) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("the failover scenario runs a userspace lab: run it as root")
    return scenario_failover(run.args.rounds, run.args.ttl)


def _floor(run: BenchRun) -> dict[str, Any]:
    raise AssertionError("main() runs the floor itself: the join scenario is judged against it")


# Every scenario by name, in the order "all" runs them.
SCENARIOS: dict[str, Scenario] = {
    "floor": Scenario(_floor),
    "join": Scenario(_join),
    "leave": Scenario(
        lambda run: asyncio.run(
            scenario_leave(run.endpoint, run.args.nodes, run.args.leaves, run.args.ttl, run.args.workers)
        )
    ),
    "storm": Scenario(
        lambda run: asyncio.run(scenario_storm(run.endpoint, run.args.nodes, run.args.workers, run.args.lease_ttl))
    ),
    "coldstart": Scenario(
        lambda run: asyncio.run(scenario_coldstart(run.endpoint, run.args.records or run.args.nodes))
    ),
    "churn": Scenario(
        lambda run: asyncio.run(
            scenario_churn(run.endpoint, run.args.nodes, run.args.churn, run.args.workers, run.args.lease_ttl)
        )
    ),
    "cost": Scenario(
        lambda run: asyncio.run(
            scenario_cost(run.endpoint, _sizes(run.args.sizes), run.args.events, run.args.locations)
        )
    ),
    "flood": Scenario(
        lambda run: asyncio.run(scenario_flood(run.endpoint, run.args.nodes, run.args.workers, run.args.flood_seconds))
    ),
    "idle": Scenario(
        lambda run: asyncio.run(
            scenario_idle(run.endpoint, run.args.nodes, run.args.workers, run.args.lease_ttl, run.args.idle_seconds)
        ),
        in_all=False,  # a minute of watching nothing happen
    ),
    "scrape": Scenario(lambda run: scenario_scrape(run.args.peers, run.args.scrapes)),
    "rotate": Scenario(_rotate, in_all=False),
    "failover": Scenario(_failover, in_all=False),
}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        raise BenchError(f"--sizes takes numbers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise BenchError(f"--sizes takes positive numbers, not {text!r}")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=(*SCENARIOS, "all"),
        default=[],
    )
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--joins", type=int, default=20, help="joins measured in the join scenario")
    parser.add_argument("--puts", type=int, default=50, help="puts measured in the floor scenario")
    parser.add_argument("--leaves", type=int, default=5, help="graceful leaves measured in the leave scenario")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL of the leave scenario's crash and of failover")
    parser.add_argument("--rounds", type=int, default=3, help="WAN cuts measured in the failover scenario")
    parser.add_argument(
        "--locations",
        type=int,
        default=0,
        help="join, cost: nodes spread over this many locations (docs/topology.md)",
    )
    parser.add_argument("--records", type=int, default=None, help="records for coldstart (default: --nodes)")
    parser.add_argument(
        "--floor-client",
        choices=("etcd3", "async"),
        default="etcd3",
        help="the floor's bare watchers: the etcd3 package's (a thread each) or our store's watch alone (asyncio)",
    )
    parser.add_argument("--sizes", default="1000", help="cost: record counts measured, e.g. 1000,5000,10000")
    parser.add_argument("--events", type=int, default=200, help="cost: joins (and as many leaves) measured per size")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle: the window measured")
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="flood: how long the flood lasts")
    parser.add_argument("--churn", type=int, default=20, help="random joins/leaves in the churn scenario")
    parser.add_argument(
        "--probe-rate", type=float, default=200.0, help="datagrams a second per pair in the rotate scenario"
    )
    parser.add_argument("--peers", type=int, default=1000, help="device peers of the scrape scenario")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed in the scrape scenario")
    parser.add_argument(
        "--pod-rounds", type=int, default=5, help="join, as root: labs timed for pod reachability (0: none)"
    )
    parser.add_argument("--etcd-endpoints", default=None, help="use this etcd instead of starting one")
    parser.add_argument(
        "--etcd-auth",
        action="store_true",
        help="floor and join only: etcd with TLS, client certificates and per-node roles (as the lab runs it)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=int,
        default=10,
        help="lease TTL of the simulated agents in join, storm and churn (the product's default: 10 s)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes the simulated agents are spread over"
    )
    parser.add_argument(
        "--results",
        default=str(results.DEFAULT_DIR),
        help="directory for this run's results file (command, machine, every line; hack/bench_report.py makes "
        "docs/benchmarks.md's tables from them); '' for none",
    )
    args = parser.parse_args()
    chosen = args.scenario or ["all"]
    if "all" in chosen:
        chosen = [name for name, scenario in SCENARIOS.items() if scenario.in_all]
    server = None
    pki_tmp = None
    pki_dir: Path | None = None
    if args.etcd_auth:
        if args.etcd_endpoints is not None or set(chosen) - {"floor", "join"}:
            parser.error("--etcd-auth starts an etcd of its own, for the floor and join scenarios")
        pki_tmp = tempfile.TemporaryDirectory(prefix="warren-bench-pki-")
        pki_dir = Path(pki_tmp.name)
        pki.init(pki_dir, ["127.0.0.1"])
    if args.etcd_endpoints is None:
        server = EtcdServer(pki=pki_dir)
        server.start()
        endpoint = server.endpoint
        if pki_dir is not None:
            # Root and the operator, auth on; each simulated node is given its role as it starts (AgentPool).
            server.enable_auth(prefix="/bench")
    else:
        endpoint = args.etcd_endpoints.split(",")[0]
    try:
        run = BenchRun(endpoint, args, pki_dir)
        floor: dict[str, Any] | None = None
        for scenario in dict.fromkeys(chosen):
            if scenario in ("floor", "join") and floor is None:
                before = etcd_usage(endpoint)
                floor = asyncio.run(
                    scenario_floor(endpoint, args.nodes, args.puts, args.workers, pki_dir, client=args.floor_client)
                )
                after = etcd_usage(endpoint)  # what N watchers and the puts cost etcd: planning figures
                if before is not None and after is not None:
                    floor.update({"etcd_cpu_s": round(after[0] - before[0], 2), "etcd_rss_mb": round(after[1], 1)})
                if scenario == "floor" or "floor" in chosen:
                    _emit(floor)
            if scenario == "floor":
                continue
            result = SCENARIOS[scenario].run(run)
            if isinstance(result, list):
                for line in result:
                    _emit(line)
                continue
            if scenario == "join" and floor is not None:
                if floor["p99_ms"] <= 0:  # a floor of nothing measured nothing: no ratio to report against it
                    raise BenchError(f"the floor's p99 is {floor['p99_ms']} ms: its watchers saw no events")
                result["floor_p99_ms"] = floor["p99_ms"]
                result["p99_vs_floor"] = round(result["p99_ms"] / floor["p99_ms"], 2)
            _emit(result)
    except (BenchError, TimedOut) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()
        if pki_tmp is not None:
            pki_tmp.cleanup()
    if args.results:
        print(f"bench: results in {results.save('bench', EMITTED, Path(args.results))}", file=sys.stderr)
    return 0


EMITTED: list[dict[str, Any]] = []  # this run's lines, for its results file


def _emit(result: dict[str, Any]) -> None:
    result["machine"] = results.machine()
    EMITTED.append(result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
