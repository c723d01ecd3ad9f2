"""What the lab's nodes see: their devices, their status, and pings across the mesh."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable

from pyroute2 import IPRoute

from warren_mesh.lab.agents import LabAgents
from warren_mesh.lab.layout import LabError
from warren_mesh.lab.report import LabNode, lagging_report, log_tail
from warren_mesh.process import alive
from warren_mesh.wireguard import link

PING_BATCH = 64  # pings ping_all runs at once


class LabInspection(LabAgents):
    def wait_for_mesh(self, *, timeout: float, progress: Callable[[str], None] | None = None) -> list[LabNode]:
        """Until every running node has every other running node as a peer, with a completed handshake (those it
        shares an underlay family with: the others it has as peers it never dials)."""
        if self.located() or self.blocked():
            return self._wait_for_pings(timeout=timeout, progress=progress)
        deadline = time.monotonic() + timeout
        last = ""
        nodes = self.nodes()
        reachable = {self.node_name(i): sum(1 for j in nodes if j != i and self.shares_underlay(i, j)) for i in nodes}
        while True:
            status = self.status()
            want = len(status) - 1
            done = sum(
                1 for s in status if s.agent_running and s.peers == want and s.handshaken == reachable.get(s.name, want)
            )
            line = f"waiting for the mesh: {done}/{len(status)} nodes have all {want} peers handshaken"
            if done == len(status):
                return status
            stopped = [s.name for s in status if not s.agent_running]
            if stopped:
                raise self._exited(stopped)
            if progress is not None and line != last:
                progress(line)
                last = line
            if time.monotonic() > deadline:
                lagging = [s for s in status if not (s.peers == want and s.handshaken == reachable.get(s.name))]
                raise LabError(
                    f"the mesh did not form within {timeout:.0f} s ({line}); logs in {self.state_dir}\n"
                    + "\n".join(lagging_report(s, want, log_tail(self.state_dir, s.name)) for s in lagging)
                )
            time.sleep(0.2)

    def _wait_for_pings(self, *, timeout: float, progress: Callable[[str], None] | None) -> list[LabNode]:
        """Where not every pair talks directly (locations, blocked pairs): until every node pings every other (an
        adjacency matrix, as Kilo's e2e tests check)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            stopped = [s.name for s in status if not s.agent_running]
            if stopped:
                raise self._exited(stopped)
            failing = [(a, b) for a, b, ok in self.ping_all() if not ok]
            if not failing:
                return status
            line = (
                f"waiting for the mesh: {len(failing)} pairs do not ping yet ({failing[0][0]} -> {failing[0][1]}, ...)"
            )
            if progress is not None:
                progress(line)
            if time.monotonic() > deadline:
                raise LabError(
                    f"the mesh did not form within {timeout:.0f} s ({line}); logs in {self.state_dir}\n"
                    + "\n".join(f"{s.name}'s log ends:\n{log_tail(self.state_dir, s.name)}" for s in status)
                )
            time.sleep(0.5)

    def device(self, index: int) -> dict[str, tuple[int, int, float]]:
        """Node ``index``'s WireGuard peers as public key -> (rx bytes, tx bytes, last handshake), read with
        `wg show dump` inside its namespace: the same for kernel and userspace devices. Empty if unreadable."""
        peers: dict[str, tuple[int, int, float]] = {}
        for line in self._wg(index, "dump").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 8:
                peers[fields[0]] = (int(fields[5]), int(fields[6]), float(fields[4]))
        return peers

    def _wg(self, index: int, *args: str) -> str:
        argv = ["ip", "netns", "exec", self.node_netns(index), "wg", "show", self.interface(index), *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        return result.stdout if result.returncode == 0 else ""

    def public_key(self, index: int) -> str:
        """Node ``index``'s device's public key; empty if unreadable."""
        return self._wg(index, "public-key").strip()

    def peer_config(self, index: int) -> dict[str, tuple[str, str, str]]:
        """Node ``index``'s peers as configured (not as used): public key -> (endpoint, allowed IPs, keepalive)."""
        peers = {}
        for line in self._wg(index, "dump").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 8:
                peers[fields[0]] = (fields[2], fields[3], fields[7])
        return peers

    def status(self) -> list[LabNode]:
        result = []
        for index in self.nodes():
            ns = self.node_netns(index)
            overlay: tuple[str, ...] = ()
            device = self.device(index)
            with contextlib.suppress(Exception), IPRoute(netns=ns) as ipr:
                state = link.read_link(ipr, self.interface(index))
                if state is not None:
                    overlay = tuple(address.split("/")[0] for address in state.addresses)
            pid = self._agent_pid(index)
            running = pid is not None and alive(pid)
            result.append(
                LabNode(
                    name=self.node_name(index),
                    netns=ns,
                    interface=self.interface(index),
                    underlay_ips=self.underlay_ips(index),
                    overlay_ips=overlay,
                    peers=len(device),
                    handshaken=sum(1 for _, _, handshake in device.values() if handshake > 0),
                    agent_running=running,
                    agent_ready=running and self.agent_ready(index),
                )
            )
        return result

    def exec_argv(self, node: str, command: list[str]) -> list[str]:
        index = self._index_of(node)
        return ["ip", "netns", "exec", self.node_netns(index), *command]

    def ping(self, source: int, address: str) -> bool:
        result = subprocess.run(
            ["ip", "netns", "exec", self.node_netns(source), "ping", "-c", "1", "-W", "2", address],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def ping_all(self) -> list[tuple[str, str, bool]]:
        """Ping every node's overlay addresses from every other node, ``PING_BATCH`` pings at once (a pair that
        does not answer costs its ping's 2 s of waiting once per batch, not once per pair)."""
        status = {s.name: s for s in self.status()}
        wanted: list[tuple[int, int, tuple[str, ...]]] = [
            (source, target, status[self.node_name(target)].overlay_ips)
            for source in self.nodes()
            for target in self.nodes()
            if source != target and self.shares_underlay(source, target)
        ]
        answered: dict[tuple[int, int], bool] = {}
        pings = [(source, target, address) for source, target, addresses in wanted for address in addresses]
        for start in range(0, len(pings), PING_BATCH):
            running = [
                (
                    source,
                    target,
                    subprocess.Popen(
                        ["ip", "netns", "exec", self.node_netns(source), "ping", "-c", "1", "-W", "2", address],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
                for source, target, address in pings[start : start + PING_BATCH]
            ]
            for source, target, process in running:
                ok = process.wait() == 0
                answered[(source, target)] = answered.get((source, target), True) and ok
        return [
            (self.node_name(source), self.node_name(target), bool(addresses) and answered.get((source, target), False))
            for source, target, addresses in wanted
        ]
