"""A local multi-node mesh: one network namespace per node, joined by a bridge, with real agents and WireGuard.

Layout (all inside namespaces this lab creates, so no packet ever leaves the machine):

    <prefix>-hub        bridge <prefix>br  192.168.240.1/24, and the lab's etcd listening there
    <prefix>-node<i>    veth to the bridge, 192.168.240.<10+i>/24, default route via the hub (which forwards
                        nothing: it only lets the agent find its endpoint as it would on a real host),
                        and `warren-mesh agent` with WireGuard interface <prefix><i>

Every name derives from the prefix, so ``down`` removes exactly what a lab made, also after `up` crashed and
left no state file. WireGuard interface names are unique per lab because wireguard-go's socket directory is
shared by all namespaces.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pyroute2 import IPRoute

from warren_mesh.host import cni
from warren_mesh.identity import pki
from warren_mesh.lab import cni_runtime, netns
from warren_mesh.lab.access import LabAccess
from warren_mesh.lab.report import LabNode, LabPod, lagging_report, log_tail
from warren_mesh.process import alive, connect_in_netns, in_netns, wait_exit
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.wireguard import link, uapi

SUBNET = ipaddress.ip_network("192.168.240.0/24")
NAT_SUBNET = "10.231.{index}.0/24"  # behind node i's NAT: the NAT .1, the node .2
HUB_ADDRESS = "192.168.240.1"
ETCD_PORT = 2379
METRICS_PORT = 9587


class LabError(RuntimeError):
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces and WireGuard devices: run it as root (sudo)")


class Lab:
    def __init__(self, prefix: str = "wmlab", state_dir: Path | None = None) -> None:
        if not prefix.isalnum() or len(prefix) > 8:
            raise LabError(f"lab prefix {prefix!r} must be at most 8 letters or digits")
        self.prefix = prefix
        self.state_dir = state_dir or Path("/run/warren-mesh-lab") / prefix
        self.hub = f"{prefix}-hub"
        self.bridge = f"{prefix}br"

    # --- naming -----------------------------------------------------------------------------------------------

    def node_netns(self, index: int) -> str:
        return f"{self.prefix}-node{index}"

    def interface(self, index: int) -> str:
        return f"{self.prefix}{index}"

    @staticmethod
    def node_name(index: int) -> str:
        return f"node-{index}"

    def cni_dir(self, index: int) -> Path:
        """Where node ``index``'s agent writes its CNI network config (a real node's /etc/cni/net.d)."""
        return self.state_dir / "cni" / self.node_name(index)

    def pod_netns(self, index: int, pod: str) -> str:
        return f"{self.prefix}-n{index}-{pod}"

    @staticmethod
    def underlay_ip(index: int) -> str:
        return str(SUBNET.network_address + 10 + index)

    @property
    def tls(self) -> bool:
        """Whether this lab's etcd speaks TLS and asks every client for a certificate (the default)."""
        return bool(self._load().get("tls", False))

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def etcd_endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HUB_ADDRESS}:{ETCD_PORT}"

    def access(self) -> LabAccess:
        """How a command reaches this lab's etcd: the endpoint and, with TLS, whose certificate."""
        return LabAccess(self.etcd_endpoint, self.pki_dir if self.tls else None)

    # --- state ------------------------------------------------------------------------------------------------

    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load(self) -> dict[str, object]:
        try:
            loaded = json.loads(self._state_file().read_text())
        except (FileNotFoundError, ValueError):
            return {"nodes": {}, "backend": "auto", "lease_ttl": 5}
        assert isinstance(loaded, dict)
        return loaded

    def _save(self, state: dict[str, object]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state_file().write_text(json.dumps(state, indent=2))

    def nodes(self) -> list[int]:
        nodes = self._load()["nodes"]
        assert isinstance(nodes, dict)
        return sorted(int(i) for i in nodes)

    def is_up(self) -> bool:
        return self.hub in netns.listnetns_names()

    # --- up ---------------------------------------------------------------------------------------------------

    def up(
        self,
        nodes: int,
        *,
        backend: str = "auto",
        lease_ttl: int = 5,
        resync_interval: int = 30,
        tls: bool = True,
        timeout: float = 60.0,
        pods: int = 0,
        wireguard_go: str | None = None,
        nat: Iterable[str] = (),
        progress: Callable[[str], None] | None = None,
    ) -> list[LabNode]:
        """``pods``: pods to start on each node once the mesh is up (``pod-1``, ...); ``wireguard_go``: the binary
        the userspace backend runs (None: the one on PATH); ``nat``: nodes (node-2, ...) put behind a NAT of their
        own, which keeps ports and lets nothing unsolicited in."""
        require_root()
        if self.is_up():
            raise LabError(f"a lab named {self.prefix} is already up; `warren-mesh lab down` first")
        self.down()  # leftovers of a crashed `up`
        say = progress or (lambda _: None)
        try:
            state = {
                "nodes": {},
                "backend": backend,
                "lease_ttl": lease_ttl,
                "resync_interval": resync_interval,
                "wireguard_go": wireguard_go or "",
                "nat": sorted(self._index_of_name(node, nodes) for node in nat),
            }
            self._save({**state, "tls": tls})
            if tls:  # a PKI of the lab's own: etcd's certificate for the hub's address, admin and node certificates
                pki.init(self.pki_dir, [HUB_ADDRESS])
            netns.create(self.hub)
            netns.bridge(self.bridge, ns=self.hub)
            netns.address(self.bridge, f"{HUB_ADDRESS}/{SUBNET.prefixlen}", ns=self.hub)
            etcd = EtcdServer(
                self.state_dir / "etcd",
                host=HUB_ADDRESS,
                netns=self.hub,
                client_port=ETCD_PORT,
                peer_port=ETCD_PORT + 1,
                outlive_parent=True,
                pki=self.pki_dir if tls else None,
            )
            (self.state_dir / "etcd").mkdir(exist_ok=True)
            etcd.start()
            say(f"etcd up at {self.etcd_endpoint} in namespace {self.hub}")
            if tls:  # each node's certificate may write only that node's keys (docs/security.md)
                self._admin("etcd-auth", "setup")
                say("etcd auth on: each node may write only its own keys")
            for index in range(1, nodes + 1):
                self.add_node(index)
                say(f"started {self.node_name(index)} in namespace {self.node_netns(index)}")
            self.wait_for_mesh(timeout=timeout, progress=say)
            for index in range(1, nodes + 1):
                for number in range(1, pods + 1):
                    pod = self.add_pod(self.node_name(index), f"pod-{number}")
                    say(f"started pod {pod.name} on {pod.node} at {pod.ip}")
        except BaseException:
            self.down()
            raise
        return self.status()

    def add_node(self, index: int) -> None:
        ns = self.node_netns(index)
        netns.create(ns)
        node_side, hub_side = f"{self.prefix}v{index}n", f"{self.prefix}v{index}h"
        if index in self.behind_nat():
            # The node's link goes to a NAT of its own, whose outside is on the bridge with the node's usual address.
            nat = self.nat_netns(index)
            netns.create(nat)
            outside, inside = f"{self.prefix}v{index}o", f"{self.prefix}v{index}i"
            netns.veth(outside, hub_side, ns=nat, peer_ns=self.hub)
            netns.attach(hub_side, self.bridge, ns=self.hub)
            netns.address(outside, f"{self.underlay_ip(index)}/{SUBNET.prefixlen}", ns=nat)
            netns.veth(node_side, inside, ns=ns, peer_ns=nat)
            private = ipaddress.ip_network(NAT_SUBNET.format(index=index))
            netns.address(inside, f"{private.network_address + 1}/{private.prefixlen}", ns=nat)
            netns.address(node_side, f"{private.network_address + 2}/{private.prefixlen}", ns=ns)
            self._nat_rules(index)
            gateway = str(private.network_address + 1)
        else:
            netns.veth(node_side, hub_side, ns=ns, peer_ns=self.hub)
            netns.attach(hub_side, self.bridge, ns=self.hub)
            netns.address(node_side, f"{self.underlay_ip(index)}/{SUBNET.prefixlen}", ns=ns)
            gateway = HUB_ADDRESS
        if self.tls and not (self.pki_dir / f"{pki.node_user(self.node_name(index))}.pem").exists():
            pki.issue_node(self.pki_dir, self.node_name(index))
            self._admin("etcd-auth", "add-node", self.node_name(index))
        with IPRoute(netns=ns) as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
        self.start_agent(index)

    # --- NAT --------------------------------------------------------------------------------------------------

    def nat_netns(self, index: int) -> str:
        return f"{self.prefix}-nat{index}"

    def behind_nat(self) -> set[int]:
        """The nodes behind a NAT of their own (``up(nat=...)``)."""
        nat = self._load().get("nat", [])
        return {int(i) for i in nat} if isinstance(nat, list) else set()

    def _nat_rules(self, index: int, port: int | None = None) -> None:
        """A home router: outgoing connections masqueraded behind its address (keeping the port, unless ``port``
        says which), nothing unsolicited let in. Dropping what is unsolicited before conntrack confirms it also
        keeps the NAT from taking a port for it (which would make it give the node's next packets another)."""
        outside, inside = f"{self.prefix}v{index}o", f"{self.prefix}v{index}i"
        # A port asked for applies to UDP (WireGuard); etcd's TCP connection keeps the usual masquerade.
        masquerade = (
            "masquerade" if port is None else f'meta l4proto udp masquerade to :{port}; oifname "{outside}" masquerade'
        )
        ruleset = (
            "table ip lab-nat\n"
            "delete table ip lab-nat\n"
            "table ip lab-nat {\n"
            f'  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "{outside}" {masquerade}; }}\n'
            "  chain input { type filter hook input priority 0; policy drop; ct state established,related accept; }\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy drop;\n"
            "    ct state established,related accept;\n"
            f'    iifname "{inside}" oifname "{outside}" accept;\n'
            "  }\n"
            "}\n"
        )
        ns = self.nat_netns(index)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise LabError(f"the NAT of node-{index} could not be set up: {done.stderr.strip()}")

    def rebind_nat(self, index: int, port: int) -> None:
        """Node ``index``'s NAT forgets its mappings and maps the node's traffic to ``port`` from now on (a home
        router restarted, a carrier-grade NAT that timed out): its peers see it at a new endpoint."""
        self._nat_rules(index, port)
        subprocess.run(
            ["ip", "netns", "exec", self.nat_netns(index), "conntrack", "-F"], capture_output=True, check=True
        )

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
            *self.access().flags(self.node_name(index)),
            f"--lease-ttl={state['lease_ttl']}",
            f"--resync-interval={state.get('resync_interval', 30)}",
            f"--metrics-address=0.0.0.0:{METRICS_PORT}",
            f"--cni-conf-dir={self.cni_dir(index)}",
            f"--cni-ipam-dir={self.state_dir / 'cni-ipam' / self.node_name(index)}",
            f"--wireguard-go={state.get('wireguard_go', '')}",
        ]
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

    def set_underlay(self, index: int, *, mtu: int | None = None, rate: str | None = None) -> None:
        """Make node ``index``'s link to the hub what a physical one might be: its ``mtu`` on both ends, and
        ``rate`` (tc's units: ``1gbit``) enforced by tbf on both ends, as a link of that speed would."""
        ends = ((self.node_netns(index), f"{self.prefix}v{index}n"), (self.hub, f"{self.prefix}v{index}h"))
        for ns, dev in ends:
            with IPRoute(netns=ns) as ipr:
                if mtu is not None:
                    ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], mtu=mtu)
            if rate is not None:
                tbf = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate]
                subprocess.run(
                    ["ip", "netns", "exec", ns, *tbf, "burst", "256kb", "latency", "50ms"],
                    capture_output=True,
                    check=True,
                )

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
        flags = [f"--agent-metrics=http://{self.underlay_ip(i)}:{METRICS_PORT}/metrics" for i in self.nodes()]
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

    def wait_for_mesh(self, *, timeout: float, progress: Callable[[str], None] | None = None) -> list[LabNode]:
        """Until every running node has every other running node as a peer, with a completed handshake."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            status = self.status()
            want = len(status) - 1
            done = sum(1 for s in status if s.agent_running and s.peers == want and s.handshaken == want)
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
                lagging = [s for s in status if not (s.peers == want and s.handshaken == want)]
                raise LabError(
                    f"the mesh did not form within {timeout:.0f} s ({line}); logs in {self.state_dir}\n"
                    + "\n".join(lagging_report(s, want, log_tail(self.state_dir, s.name)) for s in lagging)
                )
            time.sleep(0.2)

    def _exited(self, names: list[str]) -> LabError:
        return LabError(
            f"the agent of {', '.join(names)} exited; logs in {self.state_dir}\n"
            + "\n".join(f"{name}'s log ends:\n{log_tail(self.state_dir, name)}" for name in names)
        )

    # --- looking at it ----------------------------------------------------------------------------------------

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

    def rotate_key(self, node: str) -> None:
        """`warren-mesh rotate-key --node NODE`, as the admin."""
        self._admin("rotate-key", f"--node={node}")

    def status(self) -> list[LabNode]:
        result = []
        for index in self.nodes():
            ns = self.node_netns(index)
            overlay = None
            device = self.device(index)
            with contextlib.suppress(Exception), IPRoute(netns=ns) as ipr:
                state = link.read_link(ipr, self.interface(index))
                if state is not None and state.address is not None:
                    overlay = state.address.split("/")[0]
            pid = self._agent_pid(index)
            running = pid is not None and alive(pid)
            result.append(
                LabNode(
                    name=self.node_name(index),
                    netns=ns,
                    interface=self.interface(index),
                    underlay_ip=self.underlay_ip(index),
                    overlay_ip=overlay,
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

    @staticmethod
    def _index_of_name(node: str, nodes: int) -> int:
        """``node-3`` (or ``3``) of a lab of ``nodes`` nodes, before they exist."""
        number = node.removeprefix("node-")
        if not number.isdigit() or not 1 <= int(number) <= nodes:
            raise LabError(f"--nat {node!r}: not one of node-1 .. node-{nodes}")
        return int(number)

    def _index_of(self, node: str) -> int:
        for index in self.nodes():
            if node in (self.node_name(index), str(index), self.node_netns(index)):
                return index
        raise LabError(f"no node {node!r} in this lab (nodes: {', '.join(self.node_name(i) for i in self.nodes())})")

    def ping(self, source: int, address: str) -> bool:
        result = subprocess.run(
            ["ip", "netns", "exec", self.node_netns(source), "ping", "-c", "1", "-W", "2", address],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def ping_all(self) -> list[tuple[str, str, bool]]:
        """Ping every node's overlay address from every other node."""
        status = {s.name: s for s in self.status()}
        results = []
        for source in self.nodes():
            for target in self.nodes():
                if source == target:
                    continue
                address = status[self.node_name(target)].overlay_ip
                ok = address is not None and self.ping(source, address)
                results.append((self.node_name(source), self.node_name(target), ok))
        return results

    # --- pods -----------------------------------------------------------------------------------------------

    def add_pod(self, node: str, pod: str, *, timeout: float = 30.0) -> LabPod:
        """A pod on ``node``: a network namespace attached to the node's CNI network by the standard plugins, with
        the conflist its agent wrote, as a container runtime does."""
        index = self._index_of(node)
        if not pod or not pod.replace("-", "").isalnum() or len(pod) > 20:
            raise LabError(f"pod name {pod!r}: letters, digits and '-', at most 20")
        state = self._load()
        pods = state.setdefault("pods", {})
        assert isinstance(pods, dict)
        if pod in pods.get(self.node_name(index), {}):
            raise LabError(f"{node} has a pod {pod} already")
        conflist_path = self.cni_dir(index) / cni.CONFLIST_NAME
        deadline = time.monotonic() + timeout
        while not conflist_path.exists():
            if time.monotonic() > deadline:
                raise LabError(f"{node}'s agent wrote no CNI network config ({conflist_path}) in {timeout:.0f} s")
            time.sleep(0.1)
        conflist = json.loads(conflist_path.read_text())
        attachment = cni_runtime.Attachment(self.node_netns(index), self.pod_netns(index, pod), f"{node}-{pod}")
        netns.create(attachment.pod_netns)
        try:
            result = cni_runtime.add(conflist, attachment)
        except BaseException:
            netns.remove(attachment.pod_netns)
            raise
        ip = str(result["ips"][0]["address"]).split("/", 1)[0]
        pods.setdefault(self.node_name(index), {})[pod] = {"netns": attachment.pod_netns, "ip": ip, "result": result}
        self._save(state)
        return LabPod(pod, self.node_name(index), attachment.pod_netns, ip)

    def delete_pod(self, node: str, pod: str) -> None:
        index = self._index_of(node)
        state = self._load()
        pods = state.get("pods", {})
        assert isinstance(pods, dict)
        entry = pods.get(self.node_name(index), {}).pop(pod, None)
        if entry is None:
            raise LabError(f"{node} has no pod {pod}")
        conflist_path = self.cni_dir(index) / cni.CONFLIST_NAME
        attachment = cni_runtime.Attachment(self.node_netns(index), entry["netns"], f"{self.node_name(index)}-{pod}")
        try:
            if conflist_path.exists():
                cni_runtime.delete(json.loads(conflist_path.read_text()), entry["result"], attachment)
        finally:
            netns.remove(entry["netns"])
            self._save(state)

    def pods(self) -> list[LabPod]:
        pods = self._load().get("pods", {})
        assert isinstance(pods, dict)
        return [
            LabPod(name, node, entry["netns"], entry["ip"])
            for node, on_node in sorted(pods.items())
            for name, entry in sorted(on_node.items())
        ]

    def pod_exec_argv(self, node: str, pod: str, command: list[str]) -> list[str]:
        for known in self.pods():
            if known.name == pod and node in (known.node, str(self._index_of(node))):
                return ["ip", "netns", "exec", known.netns, *command]
        raise LabError(f"{node} has no pod {pod}")

    def pod_ping(self, source: LabPod, address: str) -> bool:
        argv = ["ip", "netns", "exec", source.netns, "ping", "-c", "1", "-W", "2", address]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def ping_pods(self) -> list[tuple[str, str, bool]]:
        """Ping every pod from every pod on another node."""
        pods = self.pods()
        return [
            (f"{a.node}/{a.name}", f"{b.node}/{b.name}", self.pod_ping(a, b.ip))
            for a in pods
            for b in pods
            if a.node != b.node
        ]

    # --- down -------------------------------------------------------------------------------------------------

    def down(self, *, keep_logs: Path | None = None) -> list[str]:
        """Remove everything this lab made: agents, namespaces (with wireguard-go and etcd), sockets, state.
        ``keep_logs``: first move the agents' and etcd's logs there (a test keeps what explains its failure)."""
        removed: list[str] = []
        for index in self.nodes():
            pid = self._agent_pid(index)
            if pid is not None and alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # revokes its lease while etcd is still there
        for index in self.nodes():
            pid = self._agent_pid(index)
            if pid is not None and not wait_exit(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_exit(pid, 5)
        removed.extend(f"namespace {name}" for name in netns.remove_all(f"{self.prefix}-"))
        for sock in uapi.SOCKET_DIR.glob(f"{self.prefix}*.sock"):
            sock.unlink(missing_ok=True)
            removed.append(f"socket {sock}")
        with IPRoute() as ipr:  # a veth end left in our namespace by a crash between create and move
            for link_msg in ipr.get_links():
                name = link_msg.get("IFLA_IFNAME") or ""
                if name.startswith(f"{self.prefix}v"):
                    ipr.link("del", index=link_msg["index"])
                    removed.append(f"link {name}")
        if keep_logs is not None and self.state_dir.exists():
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in [*self.state_dir.glob("*.log"), *self.state_dir.glob("etcd/*.log")]:
                shutil.move(log, keep_logs / log.name)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)
            removed.append(f"state {self.state_dir}")
        return removed
