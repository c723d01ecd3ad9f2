"""Simulated agents for hack/bench.py, spread over worker processes so that N=1000 fits on a 2-core machine.

Every simulated agent is the real agent code (store, registrar, reconciler, metrics) on a memory device. A worker
process hosts a share of them on its own event loop; the benchmark drives the workers through ``AgentPool``,
which speaks JSON lines over each worker's stdin/stdout. Conditions the benchmark waits for ("every agent has
N-1 peers", "every agent applied key K") are evaluated inside the workers, next to the agents, so waiting costs
no round trips per poll.

A worker is this file run as a script: ``python hack/agent_pool.py ENDPOINT PREFIX KEY_DIR TTL PKI_DIR`` (PKI_DIR
``-`` for plain http; else etcd speaks TLS with auth on, and each agent uses its own node certificate).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from prometheus_client import Counter

from warren_mesh.agent.app import Agent
from warren_mesh.identity import pki
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.store import roles
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.testkit.simulated import SimulatedAgents
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.netaddr import parse_endpoints
from warren_mesh.wireguard.memory import MemoryBackend

_POLL = 0.002  # seconds between checks of a condition inside a worker
_LAG_PROBE = 0.1  # seconds between the loop-lag probe's timers
WORKER_NICENESS = 5


class BenchError(Exception):
    """A condition was not reached in time, or a worker failed."""


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(_POLL)


# --- inside a worker -----------------------------------------------------------------------------------------


class _Worker:
    """The agents of one worker process, and the floor's bare etcd3 watchers when asked for them."""

    def __init__(self, endpoint: str, prefix: str, key_dir: Path, ttl: int, pki_dir: Path | None) -> None:
        self.endpoint = endpoint
        self.pki_dir = pki_dir
        self.pool = SimulatedAgents(endpoint, prefix, key_dir, ttl=ttl, interface="wgbench")
        self.agents = self.pool.agents
        self._marks: dict[str, int] = {}
        self._floor: _FloorWatchers | None = None
        self._lag_monitor: asyncio.Task[None] | None = None
        self._worst_lag = 0.0

    @staticmethod
    def _device(agent: Agent) -> MemoryBackend:
        backend = agent.backend
        assert isinstance(backend, MemoryBackend)
        return backend

    async def start(self, name: str, port: int) -> str:
        tls = None if self.pki_dir is None else credentials(self.pki_dir, pki.node_user(name))
        return self.pool.start(name, port=port, tls=tls).key.public_key

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
        )

    async def applied(self, key: str, present: bool, names: list[str] | None, timeout: float) -> dict[str, float]:
        """Wait until the agents (``names``, default all) have (or, ``present`` false, lack) peer ``key``; when each
        last set (or removed) it, as wall-clock time."""
        agents = [self.agents[n] for n in names] if names is not None else list(self.agents.values())
        await wait_until(
            lambda: all((key in self._device(a).peers) == present for a in agents), timeout, f"peer {key[:8]}"
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
        await wait_until(lambda: node in agent.view.nodes, timeout, f"{node}'s record")
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

    async def floor_watch(self, prefix: str, watchers: int, puts: int) -> None:
        self._floor = _FloorWatchers(self.endpoint, prefix, watchers, puts, self.pki_dir)

    async def floor_received(self, index: int, timeout: float) -> list[float]:
        floor = self._floor
        assert floor is not None
        await wait_until(lambda: floor.count(index) == floor.watchers, timeout, f"floor put {index}")
        return floor.received[index]

    async def floor_close(self) -> None:
        if self._floor is not None:
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


def credentials(pki_dir: Path, stem: str) -> EtcdTls:
    return EtcdTls(pki_dir / "ca.pem", pki_dir / f"{stem}.pem", pki_dir / f"{stem}-key.pem")


def etcd3_client(host: str, port: int, pki_dir: Path | None) -> Any:
    """The etcd3 package's client (the floor's), as the admin when etcd speaks TLS."""
    import etcd3

    if pki_dir is None:
        return etcd3.client(host=host, port=port, timeout=10)
    admin = credentials(pki_dir, "admin")
    return etcd3.client(
        host=host,
        port=port,
        timeout=10,
        ca_cert=str(admin.ca_file),
        cert_cert=str(admin.cert_file),
        cert_key=str(admin.key_file),
    )


def _worker_main() -> None:
    endpoint, prefix, key_dir, ttl = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    pki_dir = None if sys.argv[5] == "-" else Path(sys.argv[5])
    # Below etcd's priority: in a cluster etcd has CPUs of its own, here it shares two cores with a thousand
    # simulated agents. At equal priority the workers took ~2/3 of the CPU in a storm, etcd answered lease
    # refreshes up to ~10 s late, and a varying number of leases expired (converged in 55-117 s over five runs;
    # 53-58 s niced). Both the agents and the floor's bare watchers run in these workers, so both are judged alike.
    os.nice(WORKER_NICENESS)
    asyncio.run(_serve(_Worker(endpoint, prefix, key_dir, ttl, pki_dir)))


# --- in the benchmark ----------------------------------------------------------------------------------------


class _WorkerHandle:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            reply = json.loads(line)
            future = self._waiting.pop(reply["id"])
            if "error" in reply:
                future.set_exception(BenchError(reply["error"]))
            else:
                future.set_result(reply["result"])
        for future in self._waiting.values():
            future.set_exception(BenchError(f"worker {self.process.pid} exited"))

    async def call(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        self.process.stdin.write((json.dumps({"id": self._next_id, "op": op, "args": args}) + "\n").encode())
        await self.process.stdin.drain()
        return await future

    async def close(self) -> None:
        assert self.process.stdin is not None
        if self.process.returncode is None:
            self.process.stdin.write(b'{"op": "exit"}\n')
            await self.process.stdin.drain()
            self.process.stdin.close()
            try:
                async with asyncio.timeout(120):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._reader.cancel()


class AgentPool:
    """N simulated agents over ``workers`` processes, placed round-robin by start order."""

    def __init__(
        self, endpoint: str, scenario: str, key_dir: Path, *, workers: int, ttl: int = 10, pki_dir: Path | None = None
    ) -> None:
        """``pki_dir``: etcd speaks TLS with auth on; each agent gets a certificate and a role of its own."""
        self.endpoint, self.key_dir, self.ttl, self.workers, self.pki_dir = endpoint, key_dir, ttl, workers, pki_dir
        self._admin: EtcdStore | None = None
        self.prefix = f"/bench-{scenario}/{time.time_ns()}"
        self._handles: list[_WorkerHandle] = []
        self.keys: dict[str, str] = {}  # live agent -> public key
        self._placed: dict[str, int] = {}  # live agent -> worker index
        self._started = 0

    async def __aenter__(self) -> AgentPool:
        for _ in range(self.workers):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                self.endpoint,
                self.prefix,
                str(self.key_dir),
                str(self.ttl),
                str(self.pki_dir or "-"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self._handles.append(_WorkerHandle(process))
        await self._each("ping")  # start-up (imports) is not part of any measurement
        if self.pki_dir is not None:
            self._admin = EtcdStore(self.endpoint, tls=credentials(self.pki_dir, "admin"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(handle.close() for handle in self._handles))
        if self._admin is not None:
            await self._admin.close()

    @property
    def names(self) -> list[str]:
        return list(self.keys)

    async def _each(self, op: str, **args: Any) -> list[Any]:
        return list(await asyncio.gather(*(handle.call(op, **args) for handle in self._handles)))

    async def start(self, name: str) -> str:
        index, port = self._started % self.workers, 20000 + self._started
        self._started += 1
        if self.pki_dir is not None and self._admin is not None:  # enrolment is not part of any measurement
            pki.issue_node(self.pki_dir, name)
            await roles.add_node(EtcdAuth(self._admin), KeySchema(self.prefix), name)
        key: str = await self._handles[index].call("start", name=name, port=port)
        self.keys[name], self._placed[name] = key, index
        return key

    async def stop(self, name: str) -> None:
        await self._handles[self._placed.pop(name)].call("stop", name=name)
        del self.keys[name]

    async def settle(self, timeout: float = 120, *, peers: int | None = None) -> None:
        """Every agent has ``peers`` peers, by default every other agent."""
        await self._each("settle", peers=len(self.keys) - 1 if peers is None else peers, timeout=timeout)

    async def applied(
        self, key: str, *, present: bool, names: list[str] | None = None, timeout: float = 30
    ) -> dict[str, float]:
        """When each agent (of ``names``, default all) set (or removed) peer ``key``, once all have."""
        if names is None:
            parts = await self._each("applied", key=key, present=present, names=None, timeout=timeout)
        else:
            by_worker: dict[int, list[str]] = {}
            for name in names:
                by_worker.setdefault(self._placed[name], []).append(name)
            parts = await asyncio.gather(
                *(
                    self._handles[i].call("applied", key=key, present=present, names=group, timeout=timeout)
                    for i, group in by_worker.items()
                )
            )
        return {name: at for part in parts for name, at in part.items()}

    async def published_at(self, node: str, observer: str, timeout: float = 30) -> float:
        result: float = await self._handles[self._placed[observer]].call("published_at", node=node, timeout=timeout)
        return result

    async def peer_counts(self) -> dict[str, int]:
        return {name: n for part in await self._each("peer_counts") for name, n in part.items()}

    async def mark(self) -> None:
        await self._each("mark")

    async def untouched_changes(self, churned: set[str]) -> int:
        return sum(await self._each("untouched_changes", churned=sorted(churned)))

    async def devices_match(self, registered: set[str]) -> bool:
        return all(await self._each("devices_match", registered=sorted(registered)))

    async def rebuilds(self) -> int:
        return sum(await self._each("rebuilds"))

    async def work(self) -> dict[str, float]:
        """Reconcile passes, watch restarts and re-registrations, summed over every agent."""
        parts = await self._each("work")
        return {key: sum(part[key] for part in parts) for key in parts[0]}

    async def loop_lag(self) -> float:
        """The worst event-loop lag of any worker since the last call (seconds); the first call starts measuring."""
        return float(max(await self._each("loop_lag")))

    async def floor(self, prefix: str, watchers: int, puts: int, put: Callable[[str], None]) -> list[float]:
        """The floor with the same packing as the agents: ``watchers`` bare etcd3 watchers spread over the workers;
        each of ``puts`` keys is written with ``put`` and timed until every watcher received it (milliseconds)."""
        shares = [watchers // self.workers + (1 if i < watchers % self.workers else 0) for i in range(self.workers)]
        await asyncio.gather(
            *(
                h.call("floor_watch", prefix=prefix, watchers=n, puts=puts)
                for h, n in zip(self._handles, shares, strict=True)
            )
        )
        latencies: list[float] = []
        try:
            for i in range(puts):
                sent = time.time()
                await asyncio.to_thread(put, f"{prefix}{i}")
                received = await asyncio.gather(
                    *(
                        h.call("floor_received", index=i, timeout=10)
                        for h, n in zip(self._handles, shares, strict=True)
                        if n
                    )
                )
                latencies.extend((t - sent) * 1000 for part in received for t in part)
        finally:
            await self._each("floor_close")
        return latencies


if __name__ == "__main__":
    _worker_main()
