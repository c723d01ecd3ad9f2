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
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from pyroute2 import IPRoute

from warren_mesh.identity import pki
from warren_mesh.lab import netns
from warren_mesh.lab.inspection import LabInspection
from warren_mesh.lab.layout import (
    ETCD_PORT,
    HUB_ADDRESS,
    HUB_ADDRESS6,
    NAT_SUBNET,
    OVERLAYS,
    SUBNET,
    SUBNET6,
    UNDERLAYS,
    LabError,
    require_root,
)
from warren_mesh.lab.locations import LabLocations, parse_locations
from warren_mesh.lab.nat import LabNat
from warren_mesh.lab.pods import LabPods
from warren_mesh.lab.report import LabNode
from warren_mesh.process import alive, wait_exit
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.values.keyspace import DEFAULT_PREFIX, SCHEMA_VERSION, KeySchema
from warren_mesh.wireguard import uapi

SCHEMA = KeySchema(DEFAULT_PREFIX)  # the lab's mesh: the agents' default prefix


class Lab(LabPods, LabInspection, LabNat, LabLocations):
    """A lab on this machine, named by its prefix: brought up, grown a node at a time, and taken down."""

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
        underlay: str = "ipv4",
        underlay_of: dict[str, str] | None = None,
        overlay: str = "ipv4",
        locations: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> list[LabNode]:
        """``pods``: pods to start on each node once the mesh is up (``pod-1``, ...); ``wireguard_go``: the binary
        the userspace backend runs (None: the one on PATH); ``nat``: nodes (node-2, ...) put behind a NAT of their
        own, which keeps ports and lets nothing unsolicited in. ``underlay``: every node's underlay (ipv4, ipv6
        or dual), ``underlay_of``: some nodes' own (node-3: ipv4); ``overlay``: the mesh's overlay and pod
        networks (ipv4, ipv6 or dual); ``locations``: nodes in locations of their own networks (lab/locations.py:
        ``a:3:2,b:2``, as many nodes as ``nodes``)."""
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
            underlays = self._underlays(nodes, underlay, underlay_of or {})
            state["underlay"] = underlays
            if overlay not in OVERLAYS:
                raise LabError(f"--overlay {overlay!r} is not one of {', '.join(OVERLAYS)}")
            if state["nat"] and any(u != "ipv4" for u in underlays.values()):
                raise LabError("--nat is for IPv4 underlays (IPv6 has no NAT to put a node behind)")
            if locations:
                placement = state["placement"] = parse_locations(locations)
                if len(placement) != nodes:
                    raise LabError(f"--locations {locations!r} places {len(placement)} nodes, not {nodes}")
                if state["nat"] or any(u != "ipv4" for u in underlays.values()):
                    raise LabError("--locations is for IPv4 underlays without --nat")
            self._save({**state, "tls": tls})
            if tls:  # a PKI of the lab's own: etcd's certificate for the hub's address, admin and node certificates
                pki.init(self.pki_dir, [HUB_ADDRESS, HUB_ADDRESS6])
            netns.create(self.hub)
            netns.bridge(self.bridge, ns=self.hub)
            netns.address(self.bridge, f"{HUB_ADDRESS}/{SUBNET.prefixlen}", ns=self.hub)
            netns.address(self.bridge, f"{HUB_ADDRESS6}/{SUBNET6.prefixlen}", ns=self.hub)
            if locations:
                self._location_bridges()
            etcd = EtcdServer(
                self.state_dir / "etcd",
                host=HUB_ADDRESS,
                also_on=(HUB_ADDRESS6,),
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
                # The first nodes' users and roles with the rest of the setup: each `warren-mesh` run in the hub
                # costs a Python start (~1 s here, ~11 s in the emulated VM of the kernel tests).
                names = [self.node_name(index) for index in range(1, nodes + 1)]
                for name in names:
                    pki.issue_node(self.pki_dir, name)
                self._admin("etcd-auth", "setup", *(f"--node={name}" for name in names))
                say("etcd auth on: each node may write only its own keys")
            if OVERLAYS[overlay]:
                self.put_config({"schema": SCHEMA_VERSION, **OVERLAYS[overlay]})
                say(f"mesh networks: {OVERLAYS[overlay]}")
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
        if self.location(index) is not None:
            gateway = self._located_links(index, ns)
        elif index in self.behind_nat():
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
            for address in self.underlay_ips(index):
                network = SUBNET6 if ":" in address else SUBNET
                netns.address(node_side, f"{address}/{network.prefixlen}", ns=ns)
            gateway = HUB_ADDRESS
        if self.tls and not (self.pki_dir / f"{pki.node_user(self.node_name(index))}.pem").exists():
            # A node added after `up` (the nodes `up` starts got their certificates and roles with the setup).
            pki.issue_node(self.pki_dir, self.node_name(index))
            self._admin("etcd-auth", "add-node", self.node_name(index))
        underlay = self.underlay(index)
        with IPRoute(netns=ns) as ipr:
            if underlay != "ipv6":
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
            if self.location(index) is not None:
                # etcd over the location's own network, also from a node with a WAN link: cutting that link cuts
                # the node off from other locations only, as in kilo#489 (its agent stays healthy).
                ipr.route("add", dst=f"{HUB_ADDRESS}/32", gateway=gateway)
            if underlay != "ipv4":
                ipr.route("add", dst="::/0", gateway=HUB_ADDRESS6)
        self.start_agent(index)

    def _underlays(self, nodes: int, underlay: str, underlay_of: dict[str, str]) -> dict[str, str]:
        """Every node's underlay by index, as the state file keeps it."""
        found = {str(index): underlay for index in range(1, nodes + 1)}
        for node, family in underlay_of.items():
            found[str(self._index_of_name(node, nodes))] = family
        bad = sorted(set(found.values()) - set(UNDERLAYS))
        if bad:
            raise LabError(f"underlay {bad[0]!r} is not one of {', '.join(UNDERLAYS)}")
        return found

    def put_config(self, doc: dict[str, object]) -> None:
        """Put the mesh config, as the operator would, before any node registers."""
        argv = ["ip", "netns", "exec", self.hub, *self.access().etcdctl("put", SCHEMA.config)]
        done = subprocess.run(argv, input=json.dumps(doc).encode(), capture_output=True, check=False)
        if done.returncode != 0:
            raise LabError(f"writing the mesh config failed: {done.stderr.decode(errors='replace').strip()}")

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
