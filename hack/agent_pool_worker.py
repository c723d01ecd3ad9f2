"""A worker of hack/agent_pool.py: a share of the simulated agents (and of the floor's bare watchers) on one event
loop, driven by JSON lines on stdin and answering on stdout.

Run as ``python hack/agent_pool_worker.py ENDPOINT PREFIX KEY_DIR TTL PKI_DIR`` (PKI_DIR ``-`` for plain http; else
etcd speaks TLS with auth on, and each agent uses its own node certificate).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from prometheus_client import Counter

from agent_pool import credentials, etcd3_client
from bench_run import BenchError
from warren_mesh.agent.app import Agent
from warren_mesh.identity import pki
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.testkit.simulated import SimulatedAgents
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.values.netaddr import parse_endpoints
from warren_mesh.values.watch import Events
from warren_mesh.wireguard.memory import MemoryBackend

_POLL = 0.002  # seconds between checks of a condition inside a worker
_LAG_PROBE = 0.1  # seconds between the loop-lag probe's timers
WORKER_NICENESS = 5


class _Worker:
    """The agents of one worker process, and the floor's bare etcd3 watchers when asked for them."""

    def __init__(self, endpoint: str, prefix: str, key_dir: Path, ttl: int, pki_dir: Path | None) -> None:
        self.endpoint = endpoint
        self.pki_dir = pki_dir
        self.pool = SimulatedAgents(endpoint, prefix, key_dir, ttl=ttl, interface="wgbench")
        self.agents = self.pool.agents
        self._marks: dict[str, int] = {}
        self._floor: _FloorWatchers | _StoreWatchers | None = None
        self._lag_monitor: asyncio.Task[None] | None = None
        self._worst_lag = 0.0

    @staticmethod
    def _device(agent: Agent) -> MemoryBackend:
        backend = agent.backend
        assert isinstance(backend, MemoryBackend)
        return backend

    async def start(self, name: str, port: int, location: str | None = None, external: bool = False) -> str:
        tls = None if self.pki_dir is None else credentials(self.pki_dir, pki.node_user(name))
        return self.pool.start(name, port=port, tls=tls, location=location, external=external).key.public_key

    def _carrier(self, agent: Agent, address: str) -> str | None:
        """The public key of the peer of ``agent``'s device that carries ``address`` (a /32 or /128), or None."""
        return next((key for key, peer in self._device(agent).peers.items() if address in peer.allowed_ips), None)

    def _host_routes(self, agent: Agent, nodes: list[str]) -> list[str]:
        """The overlay host routes of ``nodes`` as ``agent`` knows them (absent: not in its view yet)."""
        routes: list[str] = []
        for node in nodes:
            entry = agent.view.nodes.get(node)
            if entry is None:
                return []
            routes.extend(f"{ip}/{ip.max_prefixlen}" for ip in entry.record.overlay_ips)
        return routes

    async def settle_routes(self, nodes: list[str], timeout: float) -> None:
        """Located meshes (docs/topology.md): until every agent's device routes every other node of ``nodes`` to
        some peer (its own, or its gateway)."""

        def routed(agent: Agent) -> bool:
            others = [n for n in nodes if n != agent.settings.node_name]
            routes = self._host_routes(agent, others)
            return len(routes) >= len(others) and all(self._carrier(agent, r) is not None for r in routes)

        await wait_until(lambda: self._alive() and all(map(routed, self.agents.values())), timeout, "the routes")

    async def routed(self, node: str, names: list[str] | None, timeout: float) -> dict[str, float]:
        """Wait until the agents (``names``, default all) route ``node``'s overlay address to some peer; when each
        last set the peer that carries it, as wall-clock time."""
        agents = [self.agents[n] for n in names] if names is not None else list(self.agents.values())

        def carriers() -> dict[str, str | None]:
            return {
                a.settings.node_name: next((self._carrier(a, route) for route in self._host_routes(a, [node])), None)
                for a in agents
            }

        await wait_until(lambda: all(c is not None for c in carriers().values()), timeout, f"{node}'s route")
        found = carriers()
        return {
            a.settings.node_name: max(
                op.at
                for op in self._device(a).operations
                if op.action == "set_peer" and op.target == found[a.settings.node_name]
            )
            for a in agents
        }

    def _alive(self) -> bool:
        """Raise at once when an agent ended on its own (a scenario waiting on it would otherwise only time out)."""
        if self.pool.died:
            name, why = next(iter(self.pool.died.items()))
            print(f"agent {name} ended: {why}", file=sys.stderr, flush=True)
            raise BenchError(f"{len(self.pool.died)} agent(s) ended on their own, {name} first: {why.splitlines()[0]}")
        return True

    async def stop(self, name: str) -> None:
        """A graceful leave: the agent revokes its lease on the way out."""
        await self.pool.stop(name)

    async def ping(self) -> None:
        """Answered once the worker has imported everything and is serving."""

    async def settle(self, peers: int, timeout: float) -> None:
        await wait_until(
            lambda: self._alive() and all(len(self._device(a).peers) == peers for a in self.agents.values()),
            timeout,
            "the mesh",
            interval=_POLL,
        )

    async def applied(self, key: str, present: bool, names: list[str] | None, timeout: float) -> dict[str, float]:
        """Wait until the agents (``names``, default all) have (or, ``present`` false, lack) peer ``key``; when each
        last set (or removed) it, as wall-clock time."""
        agents = [self.agents[n] for n in names] if names is not None else list(self.agents.values())
        await wait_until(
            lambda: all((key in self._device(a).peers) == present for a in agents),
            timeout,
            f"peer {key[:8]}",
            interval=_POLL,
        )
        action = "set_peer" if present else "remove_peer"
        return {
            a.settings.node_name: max(
                op.at for op in self._device(a).operations if op.target == key and op.action == action
            )
            for a in agents
        }

    async def published_at(self, node: str, timeout: float) -> float:
        """The publish time of ``node``'s record as the agents here received it."""
        agent = next(iter(self.agents.values()))
        await wait_until(lambda: node in agent.view.nodes, timeout, f"{node}'s record", interval=_POLL)
        return agent.view.nodes[node].record.published_at

    async def peer_counts(self) -> dict[str, int]:
        return {name: len(self._device(a).peers) for name, a in self.agents.items()}

    async def mark(self) -> None:
        self._marks = {name: len(self._device(a).operations) for name, a in self.agents.items()}

    async def untouched_changes(self, churned: list[str]) -> int:
        """Peer changes since ``mark`` on peers that are not in ``churned``, by agents present at the mark."""
        churned_keys = set(churned)
        count = 0
        for name, agent in self.agents.items():
            if name not in self._marks:
                continue  # joined since: configuring every peer is its first setup, not a change
            operations = list(self._device(agent).operations)[self._marks[name] :]
            count += sum(
                1 for op in operations if op.action in ("set_peer", "remove_peer") and op.target not in churned_keys
            )
        return count

    async def devices_match(self, registered: list[str]) -> bool:
        """Every device here holds exactly the registered keys but its own."""
        keys = set(registered)
        return all(set(self._device(a).peers) == keys - {a.key.public_key} for a in self.agents.values())

    async def rebuilds(self) -> int:
        return sum(a.reconciler.rebuilds for a in self.agents.values() if a.reconciler is not None)

    async def work(self) -> dict[str, float]:
        """What the agents here did so far: reconcile passes, watches restarted, registrations beyond the first
        (each one a lease that was lost), from their metrics."""
        agents = list(self.agents.values())
        restarts = sum(_total(a.metrics.watch_restarts) for a in agents)
        registrations = sum(_total(a.metrics.registrations) for a in agents)
        passes = sum(a.reconciler.passes for a in agents if a.reconciler is not None)
        return {"passes": passes, "watch_restarts": restarts, "reregistrations": registrations - len(agents)}

    async def loop_lag(self) -> float:
        """The longest a timer here fired late since the last call, in seconds: how long any agent of this worker
        waited for its turn (its keepalive included). Started by the first call."""
        if self._lag_monitor is None:
            self._lag_monitor = asyncio.create_task(self._watch_lag())
        worst, self._worst_lag = self._worst_lag, 0.0
        return worst

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + _LAG_PROBE
            await asyncio.sleep(_LAG_PROBE)
            self._worst_lag = max(self._worst_lag, loop.time() - due)

    async def floor_watch(self, prefix: str, watchers: int, puts: int, client: str = "etcd3") -> None:
        if client == "etcd3":
            self._floor = _FloorWatchers(self.endpoint, prefix, watchers, puts, self.pki_dir)
        else:
            self._floor = _StoreWatchers(self.endpoint, prefix, watchers, puts, self.pki_dir)
            await self._floor.started()

    async def floor_received(self, index: int, timeout: float) -> list[float]:
        floor = self._floor
        assert floor is not None
        await wait_until(lambda: floor.count(index) == floor.watchers, timeout, f"floor put {index}", interval=_POLL)
        return floor.received[index]

    async def floor_close(self) -> None:
        if isinstance(self._floor, _StoreWatchers):
            await self._floor.aclose()
        elif self._floor is not None:
            self._floor.close()
        self._floor = None

    async def close(self) -> None:
        if self._lag_monitor is not None:
            self._lag_monitor.cancel()
        for name in list(self.agents):
            await self.stop(name)
        await self.floor_close()


def _total(counter: Counter) -> float:
    """A counter's count over all its label values. Collecting just this counter: asking the agent's registry
    would collect every metric, its per-peer collector reading the whole device, for each value asked."""
    samples = (sample for metric in counter.collect() for sample in metric.samples)
    return sum(sample.value for sample in samples if sample.name.endswith("_total"))


class _FloorWatchers:
    """N watchers on the etcd3 client alone, with nothing of ours in the way: put -> callback times."""

    def __init__(self, endpoint: str, prefix: str, watchers: int, puts: int, pki_dir: Path | None) -> None:
        host, port = parse_endpoints(endpoint)[0].target.rsplit(":", 1)
        self.watchers = watchers
        self.received: list[list[float]] = [[] for _ in range(puts)]
        self._lock = threading.Lock()
        self._clients = [etcd3_client(host, int(port), pki_dir) for _ in range(watchers)]
        self._watches = [client.add_watch_prefix_callback(prefix, self._callback) for client in self._clients]

    def _callback(self, response: Any) -> None:
        now = time.time()
        for event in getattr(response, "events", []):
            index = int(event.key.decode().rsplit("/", 1)[1])
            with self._lock:
                self.received[index].append(now)

    def count(self, index: int) -> int:
        with self._lock:
            return len(self.received[index])

    def close(self) -> None:
        # Cancel the watches but leave the clients open: etcd3's watcher thread re-dials a closed channel in a
        # loop and prints a traceback; its daemon threads end with this short-lived process.
        for client, watch_id in zip(self._clients, self._watches, strict=True):
            client.cancel_watch(watch_id)


class _StoreWatchers:
    """N watchers on our store's client (grpc.aio, all on this worker's event loop, no threads), nothing else:
    the watch stream and the decoder of every agent, without the agent. Where thousands of etcd3 clients (a thread
    each) cannot even start on two cores, this still measures etcd's fan-out."""

    def __init__(self, endpoint: str, prefix: str, watchers: int, puts: int, pki_dir: Path | None) -> None:
        self.watchers = watchers
        self.received: list[list[float]] = [[] for _ in range(puts)]
        tls = credentials(pki_dir, "admin") if pki_dir is not None else None
        self._stores = [EtcdStore(endpoint, tls=tls) for _ in range(watchers)]
        self._synced = 0
        self._tasks = [asyncio.get_running_loop().create_task(self._watch(store, prefix)) for store in self._stores]

    async def _watch(self, store: EtcdStore, prefix: str) -> None:
        async for result in store.observe(prefix):
            now = time.time()
            if isinstance(result, Events):
                for event in result.events:
                    self.received[int(event.kv.key.rsplit("/", 1)[1])].append(now)
            else:
                self._synced += 1

    async def started(self) -> None:
        await wait_until(lambda: self._synced == self.watchers, 300, "every watcher's first snapshot", interval=0.05)

    def count(self, index: int) -> int:
        return len(self.received[index])

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(store.close() for store in self._stores), return_exceptions=True)


async def _serve(worker: _Worker) -> None:
    """Answer requests from stdin, each in a task of its own (a wait must not hold up a start)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: set[asyncio.Task[None]] = set()

    async def handle(request: dict[str, Any]) -> None:
        try:
            result = await getattr(worker, request["op"])(**request["args"])
            reply = {"id": request["id"], "result": result}
        except Exception as exc:
            reply = {"id": request["id"], "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        request = json.loads(line)
        if request["op"] == "exit":
            break
        task = loop.create_task(handle(request))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await worker.close()


def _worker_main() -> None:
    endpoint, prefix, key_dir, ttl = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    pki_dir = None if sys.argv[5] == "-" else Path(sys.argv[5])
    # Below etcd's priority: in a cluster etcd has CPUs of its own, here it shares two cores with a thousand
    # simulated agents. At equal priority the workers took ~2/3 of the CPU in a storm, etcd answered lease
    # refreshes up to ~10 s late, and a varying number of leases expired (converged in 55-117 s over five runs;
    # 53-58 s niced). Both the agents and the floor's bare watchers run in these workers, so both are judged alike.
    os.nice(WORKER_NICENESS)
    asyncio.run(_serve(_Worker(endpoint, prefix, key_dir, ttl, pki_dir)))


if __name__ == "__main__":
    _worker_main()
