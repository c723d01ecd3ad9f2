"""Simulated agents for hack/bench.py, spread over worker processes so that N=1000 fits on a 2-core machine.

Every simulated agent is the real agent code (store, registrar, reconciler, metrics) on a memory device. A worker
process hosts a share of them on its own event loop; the benchmark drives the workers through ``AgentPool``,
which speaks JSON lines over each worker's stdin/stdout. Conditions the benchmark waits for ("every agent has
N-1 peers", "every agent applied key K") are evaluated inside the workers, next to the agents, so waiting costs
no round trips per poll.

A worker is hack/agent_pool_worker.py run as a script.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))


from bench_run import BenchError, proc_usage
from warren_mesh.identity import pki
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.store import roles
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.trust.records import MeshConfig, PodNetwork, encode_json
from warren_mesh.values.keyspace import KeySchema

# Overlay 10.96.0.0/16 (65,534 addresses, the default); pods 10.128.0.0/10 in /24s: 16,384 nodes.
SCALE_CONFIG = MeshConfig(pod_networks=(PodNetwork(ipaddress.ip_network("10.128.0.0/10"), 24),))

# --- inside a worker -----------------------------------------------------------------------------------------


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
                str(Path(__file__).with_name("agent_pool_worker.py")),
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
        await self._write_config()
        return self

    async def _write_config(self) -> None:
        """A mesh sized as a cluster of thousands is: the default pod network (a /16 of /24s) has room for 256
        nodes, and at N=1000 the other 744 would race for subnets that do not exist."""
        store = self._admin or EtcdStore(self.endpoint)
        try:
            await store.put(KeySchema(self.prefix).config, encode_json(SCALE_CONFIG.to_json()))
        finally:
            if store is not self._admin:
                await store.close()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(handle.close() for handle in self._handles))
        if self._admin is not None:
            await self._admin.close()

    @property
    def names(self) -> list[str]:
        return list(self.keys)

    @property
    def pids(self) -> list[int]:
        """The worker processes' (their CPU and memory are what the simulated agents cost this machine)."""
        return [handle.process.pid for handle in self._handles]

    def cpu_seconds(self) -> float:
        """CPU the worker processes have used so far (every simulated agent's, and gRPC's threads)."""
        return sum(proc_usage(pid)[1] for pid in self.pids)

    async def _each(self, op: str, **args: Any) -> list[Any]:
        return list(await asyncio.gather(*(handle.call(op, **args) for handle in self._handles)))

    async def start(self, name: str, *, location: str | None = None, external: bool = False) -> str:
        index, port = self._started % self.workers, 20000 + self._started
        self._started += 1
        if self.pki_dir is not None and self._admin is not None:  # enrolment is not part of any measurement
            pki.issue_node(self.pki_dir, name)
            await roles.add_node(EtcdAuth(self._admin), KeySchema(self.prefix), name)
        key: str = await self._handles[index].call("start", name=name, port=port, location=location, external=external)
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

    async def settle_routes(self, timeout: float = 120) -> None:
        """Located meshes: every agent routes every other node's overlay address (to it, or to its gateway)."""
        await self._each("settle_routes", nodes=self.names, timeout=timeout)

    async def routed(self, node: str, *, names: list[str], timeout: float = 30) -> dict[str, float]:
        """When each agent of ``names`` set the peer that carries ``node``'s address, once all route it."""
        by_worker: dict[int, list[str]] = {}
        for name in names:
            by_worker.setdefault(self._placed[name], []).append(name)
        parts = await asyncio.gather(
            *(
                self._handles[i].call("routed", node=node, names=group, timeout=timeout)
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

    async def floor(
        self, prefix: str, watchers: int, puts: int, put: Callable[[str], None], *, client: str = "etcd3"
    ) -> list[float]:
        """The floor with the same packing as the agents: ``watchers`` bare etcd3 watchers spread over the workers;
        each of ``puts`` keys is written with ``put`` and timed until every watcher received it (milliseconds)."""
        shares = [watchers // self.workers + (1 if i < watchers % self.workers else 0) for i in range(self.workers)]
        await asyncio.gather(
            *(
                h.call("floor_watch", prefix=prefix, watchers=n, puts=puts, client=client)
                for h, n in zip(self._handles, shares, strict=True)
            )
        )
        latencies: list[float] = []
        try:
            for i in range(puts):
                sent = time.time()
                await asyncio.to_thread(put, f"{prefix}{i}")
                # Each bare watcher is a thread of its process: at thousands, a put reaches the last one seconds
                # later (that is the figure), so the patience grows with them.
                patience = max(10.0, watchers / 50)
                received = await asyncio.gather(
                    *(
                        h.call("floor_received", index=i, timeout=patience)
                        for h, n in zip(self._handles, shares, strict=True)
                        if n
                    )
                )
                latencies.extend((t - sent) * 1000 for part in received for t in part)
        finally:
            await self._each("floor_close")
        return latencies
