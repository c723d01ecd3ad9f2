"""The lab's agents: each a `warren-mesh agent` process inside its node's namespace, started, signalled, killed
and waited for.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time

from warren_mesh.lab.layout import (
    METRICS_PORT,
    LabError,
    LabLayout,
)
from warren_mesh.lab.report import log_tail
from warren_mesh.process import alive, connect_in_netns, in_netns, wait_exit


class LabAgents(LabLayout):
    def start_agent(self, index: int) -> int:
        state = self._load()
        nodes = state["nodes"]
        assert isinstance(nodes, dict)
        args = [
            sys.executable,
            "-m",
            "warren_mesh.cli",
            "agent",
            f"--backend={state['backend']}",
            f"--node-name={self.node_name(index)}",
            f"--interface={self.interface(index)}",
            f"--key-file={self.state_dir / (self.node_name(index) + '.key')}",
            *self.access(index).flags(self.node_name(index)),
            f"--endpoint-family={'dual' if self.underlay(index) == 'dual' else 'auto'}",
            f"--lease-ttl={state['lease_ttl']}",
            f"--resync-interval={state.get('resync_interval', 30)}",
            f"--metrics-address={'0.0.0.0' if self.underlay(index) == 'ipv4' else '[::]'}:{METRICS_PORT}",
            f"--cni-conf-dir={self.cni_dir(index)}",
            f"--cni-ipam-dir={self.state_dir / 'cni-ipam' / self.node_name(index)}",
            f"--wireguard-go={state.get('wireguard_go', '')}",
        ]
        location = self.location(index)
        if location is not None:  # its location's address as its endpoint, its WAN address for other locations
            args += [f"--location={location}", f"--endpoint={self.internal_ip(index)}"]
            if self.has_external(index):
                args.append(f"--external-endpoint={self.underlay_ip(index)}")
        with (self.state_dir / f"{self.node_name(index)}.log").open("ab") as out:
            process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group, so the lab outlives the command that started it and a Ctrl-C at that
                # terminal does not reach it; not its own session, which would also make it (and the wireguard-go
                # it starts) a separate autogroup for the CPU scheduler (see wireguard/userspace.py).
                process_group=0,
                preexec_fn=in_netns(self.node_netns(index)),  # noqa: PLW1509 (one setns call)
            )
        nodes[str(index)] = process.pid
        self._save(state)
        return process.pid

    def _admin(self, *command: str) -> bytes:
        """Run a `warren-mesh` command as the admin inside the hub's namespace, where etcd listens; its output."""
        argv = [sys.executable, "-m", "warren_mesh.cli", "--log-level=warning", *command, *self.access().flags()]
        done = subprocess.run(
            argv,
            capture_output=True,
            preexec_fn=in_netns(self.hub),
            check=False,
        )
        if done.returncode != 0:
            why = (done.stderr.strip() or done.stdout.strip()).decode(errors="replace")
            raise LabError(f"`warren-mesh {' '.join(command)}` failed: {why}")
        return done.stdout

    def graph(self, *, fmt: str = "dot", stale_after: float | None = None) -> bytes:
        """`warren-mesh graph` of the lab, with every node's agent's metrics (reached over the underlay)."""
        flags = [f"--agent-metrics=http://{self.internal_ip(i)}:{METRICS_PORT}/metrics" for i in self.nodes()]
        if stale_after is not None:
            flags.append(f"--stale-after={stale_after}")
        return self._admin("graph", f"--format={fmt}", *flags)

    def kill_agent(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Stop one agent (SIGKILL: a crash; its wireguard-go keeps running, as on a real node)."""
        pid = self._agent_pid(index)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            wait_exit(pid, 10)

    def signal_agent(self, index: int, sig: int) -> None:
        """Send node ``index``'s agent a signal it handles (SIGHUP: rotate the key now)."""
        pid = self._agent_pid(index)
        if pid is None:
            raise LabError(f"node-{index} has no agent running")
        os.kill(pid, sig)

    def _agent_pid(self, index: int) -> int | None:
        nodes = self._load()["nodes"]
        assert isinstance(nodes, dict)
        pid = nodes.get(str(index))
        return int(pid) if pid is not None else None

    def agent_ready(self, index: int) -> bool:
        """Whether node ``index``'s agent answers its /healthz with 200 (asked from inside the node's namespace)."""
        try:
            sock = connect_in_netns(self.node_netns(index), ("127.0.0.1", METRICS_PORT), timeout=2.0)
        except OSError:
            return False
        conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=2.0)
        conn.sock = sock
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_for_agent(self, index: int, *, timeout: float) -> float:
        """Until node ``index``'s agent is ready; returns how long that took.

        Kept apart from wait_for_mesh because starting a Python process is not the mesh's doing and varies
        widely: ~0.3 s on a host, ~20 s in the emulated (TCG) VM of the kernel tests, where every import reads
        the host's files over 9p.
        """
        started = time.monotonic()
        while not self.agent_ready(index):
            pid = self._agent_pid(index)
            if pid is None or not alive(pid):
                raise self._exited([self.node_name(index)])
            if time.monotonic() - started > timeout:
                raise LabError(
                    f"the agent of {self.node_name(index)} was not ready within {timeout:.0f} s; "
                    f"logs in {self.state_dir}\n" + log_tail(self.state_dir, self.node_name(index))
                )
            time.sleep(0.2)
        return time.monotonic() - started

    def _exited(self, names: list[str]) -> LabError:
        return LabError(
            f"the agent of {', '.join(names)} exited; logs in {self.state_dir}\n"
            + "\n".join(f"{name}'s log ends:\n{log_tail(self.state_dir, name)}" for name in names)
        )

    def rotate_key(self, node: str) -> None:
        """`warren-mesh rotate-key --node NODE`, as the admin."""
        self._admin("rotate-key", f"--node={node}")
