"""The end-to-end scenario on a real data plane: a 3-node lab, failure, healing and growth.

Runs with wireguard-go here, and with kernel WireGuard inside the QEMU VM (test_kernel_vm.py) where this
machine's kernel has no WireGuard module.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from underlay import captured, sniff
from warren_mesh.identity import pki
from warren_mesh.identity.keys import NodeKey
from warren_mesh.lab import netns
from warren_mesh.lab.lab import Lab
from warren_mesh.lab.layout import ETCD_PORT, HUB_ADDRESS, HUB_ADDRESS6, METRICS_PORT, SUBNET
from warren_mesh.lab.probe import Probe
from warren_mesh.lab.report import LabPod
from warren_mesh.mesh import damping, endpoints
from warren_mesh.process import connect_in_netns, in_netns
from warren_mesh.testkit.waiting import wait_for
from warren_mesh.trust.records import MeshConfig
from warren_mesh.wireguard import uapi

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

TTL = 3
STARTUP = 120  # for an agent process to be ready: ~0.3 s here, ~20 s in the TCG VM (imports read files over 9p)


def _sniff_underlay(lab: Lab, seconds: float) -> subprocess.Popen[str]:
    """What crosses node-1's link, from the hub's side, for ``seconds``."""
    return sniff(f"{lab.prefix}v1h", seconds, preexec_fn=in_netns(lab.hub))


def handshakes(lab: Lab, index: int) -> dict[str, float]:
    return {key: handshake for key, (_, _, handshake) in lab.device(index).items()}


def peer_count(lab: Lab, index: int) -> int:
    return len(lab.device(index))


def transferred(lab: Lab, index: int) -> tuple[int, int]:
    device = lab.device(index)
    return sum(rx for rx, _, _ in device.values()), sum(tx for _, tx, _ in device.values())


# Scenarios run on both data planes: wireguard-go here, kernel WireGuard inside the QEMU VM (its -k kernel).
BACKENDS = ["userspace", pytest.param("kernel", marks=pytest.mark.kernel_wireguard)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mesh_end_to_end(lab: Lab, backend: str) -> None:
    status = lab.up(3, backend=backend, lease_ttl=TTL, timeout=120)
    assert [s.peers for s in status] == [2, 2, 2] and all(s.handshaken == 2 for s in status)

    # Every pair pings over the overlay, and what crosses the underlay is only WireGuard's UDP.
    sniffer = _sniff_underlay(lab, 4)
    time.sleep(0.5)
    rx_before, tx_before = transferred(lab, 1)
    results = lab.ping_all()
    assert all(ok for *_, ok in results), results
    frames = captured(sniffer)
    wireguard = [f for f in frames if f[0] == 17 and 51820 in (f[1], f[2])]
    control = [f for f in frames if f[0] == 6 and ETCD_PORT in (f[1], f[2])]  # the agent talking to etcd
    assert wireguard, "the capture saw node-1's WireGuard traffic"
    assert len(wireguard) + len(control) == len(frames), f"only WireGuard and etcd on the underlay, saw {frames}"
    rx_after, tx_after = transferred(lab, 1)
    assert rx_after > rx_before and tx_after > tx_before, "the device's transfer counters grew"

    # A crashed agent (SIGKILL) leaves every other device within TTL + 1 s. The look at both devices is part of
    # what is measured: its own cost, timed here just before (milliseconds on a host, a second in the emulated VM),
    # is the instrument's resolution and is added to the bound.
    looked = time.monotonic()
    assert peer_count(lab, 1) == 2 and peer_count(lab, 2) == 2
    look = time.monotonic() - looked
    killed = time.monotonic()
    lab.kill_agent(3, signal.SIGKILL)
    wait_for(lambda: peer_count(lab, 1) == 1 and peer_count(lab, 2) == 1, TTL + 5, "node-3 to be dropped")
    assert time.monotonic() - killed <= TTL + 1 + look, f"a look at both devices takes {look:.2f} s"

    # Restarted, it comes back with the same identity and the mesh heals. The agent's own start is waited for apart
    # (seconds in the emulated VM); from its being ready, the mesh heals in well under the limit.
    lab.start_agent(3)
    lab.wait_for_agent(3, timeout=STARTUP)
    lab.wait_for_mesh(timeout=30)
    assert all(ok for *_, ok in lab.ping_all())

    # A fourth node joins without resetting the sessions of the pairs that were there.
    existing = {i: handshakes(lab, i) for i in (1, 2, 3)}
    time.sleep(1.1)
    lab.add_node(4)
    lab.wait_for_agent(4, timeout=STARTUP)
    lab.wait_for_mesh(timeout=30)
    for i in (1, 2, 3):
        now = handshakes(lab, i)
        for key, stamp in existing[i].items():
            assert now[key] == stamp, f"node-{i}'s session with {key[:8]} was reset by an unrelated join"
    assert all(ok for *_, ok in lab.ping_all())


def _etcdctl(lab: Lab, *args: str, value: bytes | None = None) -> None:
    """etcdctl against the lab's etcd, from inside the hub's namespace (where etcd listens)."""
    subprocess.run(
        ["ip", "netns", "exec", lab.hub, *lab.access().etcdctl(*args)],
        input=value,
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        check=True,
    )


def _metrics(lab: Lab, index: int) -> str:
    sock = connect_in_netns(lab.node_netns(index), ("127.0.0.1", METRICS_PORT), timeout=2.0)
    conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=5.0)
    conn.sock = sock
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _main_routes(lab: Lab, index: int) -> list[tuple[str, int, int]]:
    with IPRoute(netns=lab.node_netns(index)) as ipr:
        return sorted(
            (f"{r.get('RTA_DST', '0.0.0.0')}/{r['dst_len']}", r["proto"], r.get("RTA_OIF", 0))
            for r in ipr.get_routes(family=socket.AF_INET, table=254)
        )


def test_records_claiming_etcd_or_the_underlay_never_cut_the_mesh_off(lab: Lab) -> None:
    """One record with allowed IPs covering the hub (etcd's address) once routed etcd into the tunnel on every
    node: every agent lost etcd, and the mesh stayed cut off after the record was deleted. And a record claiming
    the underlay subnet made the agent replace the kernel's connected route."""
    lab.up(3, backend="userspace", lease_ttl=TTL, timeout=120)
    routes = {i: _main_routes(lab, i) for i in (1, 2, 3)}
    hostile: dict[str, dict[str, object]] = {
        "/warren/mesh/v1/peers/etcd-thief": {"allowed_ips": [f"{HUB_ADDRESS}/32"]},
        "/warren/mesh/v1/peers/underlay-thief": {"allowed_ips": [str(SUBNET)], "endpoint": "192.0.2.50:51820"},
        "/warren/mesh/v1/peers/wide": {"allowed_ips": ["192.168.0.0/16"]},
        "/warren/mesh/v1/peers/default": {"allowed_ips": ["0.0.0.0/1", "128.0.0.0/1"]},
    }
    for key, fields in hostile.items():
        name = key.rsplit("/", 1)[1]
        doc = {"schema": 1, "name": name, "public_key": NodeKey.generate().public_key, **fields}
        _etcdctl(lab, "put", key, value=json.dumps(doc).encode())
    node_doc = {
        "schema": 1,
        "name": "node-evil",
        "public_key": NodeKey.generate().public_key,
        "endpoint": "192.168.240.99:51820",
        "overlay_ip": "10.96.77.7",
        "allowed_ips": [str(SUBNET)],
        "listen_port": 51820,
        "published_at": time.time(),
    }
    _etcdctl(lab, "put", "/warren/mesh/v1/nodes/node-evil", value=json.dumps(node_doc).encode())
    # And records that once crashed every agent (each now rejected alone).
    crashers = {
        "/warren/mesh/v1/nodes/no-address": json.dumps(
            {k: v for k, v in node_doc.items() if k != "overlay_ip"} | {"name": "no-address"}
        ),
        "/warren/mesh/v1/nodes/deep": '{"a":' + "[" * 2000 + "]" * 2000 + "}",
        "/warren/mesh/v1/nodes/digits": '{"schema":1,"listen_port":' + "9" * 5000 + "}",
    }
    for key, text in crashers.items():
        _etcdctl(lab, "put", key, value=text.encode())
    not_utf8 = os.fsdecode(b"/warren/mesh/v1/nodes/\xff\xfe")  # etcdctl passes the key's bytes as they are
    _etcdctl(lab, "put", not_utf8, value=b"{}")

    def counted(index: int, metric: str, reason: str) -> float:
        for line in _metrics(lab, index).splitlines():
            if line.startswith(f'{metric}{{reason="{reason}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_for(
        lambda: all(counted(i, "warren_mesh_conflicts_total", "unsafe_route") == 3 for i in (1, 2, 3)),
        15,
        "every agent to leave out the three peers that would route the underlay or etcd",
    )
    assert all(counted(i, "warren_mesh_rejected_records_total", "forbidden_network") == 1 for i in (1, 2, 3))
    assert all(counted(i, "warren_mesh_conflicts_total", "network_not_owned") == 1 for i in (1, 2, 3))
    wait_for(
        lambda: all(counted(i, "warren_mesh_rejected_records_total", "invalid_key") == 1 for i in (1, 2, 3)),
        10,
        "every agent to reject the key that is not UTF-8",
    )
    assert all(counted(i, "warren_mesh_rejected_records_total", "invalid_field") == 1 for i in (1, 2, 3))
    assert all(counted(i, "warren_mesh_rejected_records_total", "too_large") == 1 for i in (1, 2, 3))
    assert all(counted(i, "warren_mesh_rejected_records_total", "invalid_json") == 1 for i in (1, 2, 3))
    time.sleep(2)  # a few more passes: nothing may have been routed meanwhile
    assert all(node.agent_running for node in lab.status()), "an agent ended"
    for i in (1, 2, 3):
        assert _main_routes(lab, i) == routes[i], f"node-{i}'s routing table changed"
        assert "warren_mesh_etcd_up 1.0" in _metrics(lab, i), f"node-{i} lost etcd"
        assert peer_count(lab, i) == 2
    assert all(ok for *_, ok in lab.ping_all())

    # The mesh still follows etcd: the records go, and a new node joins everywhere.
    for key in [*hostile, *crashers, not_utf8, "/warren/mesh/v1/nodes/node-evil"]:
        _etcdctl(lab, "del", key)
    lab.add_node(4)
    lab.wait_for_agent(4, timeout=STARTUP)
    lab.wait_for_mesh(timeout=30)
    assert all(ok for *_, ok in lab.ping_all())


def _mesh_routes(lab: Lab, index: int) -> set[str]:
    return {dst for dst, proto, _ in _main_routes(lab, index) if proto == 158}


def test_routes_are_repaired_by_the_resync_and_follow_allowed_ips(lab: Lab) -> None:
    resync = 2
    lab.up(2, backend="userspace", lease_ttl=TTL, resync_interval=resync, timeout=120)
    base = {i: _mesh_routes(lab, i) for i in (1, 2)}  # the other node's pod subnet
    assert all(len(routes) == 1 for routes in base.values()), base
    site = {"schema": 1, "name": "site", "public_key": NodeKey.generate().public_key, "allowed_ips": ["172.30.0.0/16"]}
    _etcdctl(lab, "put", "/warren/mesh/v1/peers/site", value=json.dumps(site).encode())
    wait_for(lambda: all(_mesh_routes(lab, i) == base[i] | {"172.30.0.0/16"} for i in (1, 2)), 10, "the site's route")
    sessions = handshakes(lab, 1)
    # Someone else's route through the same interface: never the mesh's to touch.
    with IPRoute(netns=lab.node_netns(1)) as ipr:
        wg = ipr.link_lookup(ifname=lab.interface(1))[0]
        ipr.route("add", dst="10.123.0.0/24", oif=wg, proto=4)  # "static"
    # Deleted by hand, the mesh's route is back within one resync, and nothing else changed.
    subprocess.run(["ip", "netns", "exec", lab.node_netns(1), "ip", "route", "del", "172.30.0.0/16"], check=True)
    started = time.monotonic()
    wait_for(lambda: _mesh_routes(lab, 1) == base[1] | {"172.30.0.0/16"}, resync * 1.1 + 2, "the route to come back")
    took = time.monotonic() - started
    print(f"route repaired in {took:.1f} s (resync interval {resync} s)")
    assert handshakes(lab, 1) == sessions, "repairing a route touched a peer's session"
    assert ("10.123.0.0/24", 4, wg) in _main_routes(lab, 1), "a route of someone else's was touched"
    # The site gives up half its network: the stale route goes, the new one comes, on every node.
    site["allowed_ips"] = ["172.30.0.0/24"]
    _etcdctl(lab, "put", "/warren/mesh/v1/peers/site", value=json.dumps(site).encode())
    wait_for(lambda: all(_mesh_routes(lab, i) == base[i] | {"172.30.0.0/24"} for i in (1, 2)), 10, "the narrower route")
    _etcdctl(lab, "del", "/warren/mesh/v1/peers/site")
    wait_for(lambda: all(_mesh_routes(lab, i) == base[i] for i in (1, 2)), 10, "no site route left")
    assert ("10.123.0.0/24", 4, wg) in _main_routes(lab, 1)
    assert all(ok for *_, ok in lab.ping_all())


def test_no_node_can_write_another_nodes_keys_the_config_or_the_peers(lab: Lab) -> None:
    """The lab runs etcd with TLS and per-node roles by default. For every ordered pair of its 4 nodes, A's
    credential cannot put, delete or create-if-absent any key of B (its record, its claims, a new claim), the
    config or the peers, nor revoke B's lease; and the mesh is unchanged afterwards."""
    lab.up(4, backend="userspace", lease_ttl=TTL, timeout=120)
    nodes = [Lab.node_name(i) for i in (1, 2, 3, 4)]
    probe = Path(__file__).with_name("isolation_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe), lab.etcd_endpoint, str(lab.pki_dir), "/warren/mesh", *nodes],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=in_netns(lab.hub),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["allowed"] == [], "\n".join(result["allowed"])
    assert result["attempts"] == 12 * (3 * 7 + 1)  # 12 pairs x (7 keys x 3 writes + the lease)
    assert result["unchanged"], "a refused write changed the mesh"
    assert all(node.agent_running for node in lab.status())
    assert all(ok for *_, ok in lab.ping_all())


# Runs inside a pod: accept connections on a port and answer each with the address it came from.
POD_CIDR_PREFIX = str(MeshConfig().pod_networks[0].cidr.network_address).rsplit(".", 2)[0]  # "10.244" of the lab's /16
# Three datagrams to argv[1]:argv[2]; a refusal (ICMP unreachable) is not an error here.
SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    try:
        s.sendto(b"stray", (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass
"""
ECHO_SOURCE = r"""
import socket, sys
server = socket.create_server(("", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
while True:
    conn, (address, *_) = server.accept()
    conn.sendall(address.removeprefix("::ffff:").encode())  # an IPv4 client as itself, not IPv4-mapped
    conn.close()
"""
ASK = (
    "import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).recv(64).decode())"
)


def _seen_source(lab: Lab, pod: LabPod, address: str, port: int) -> str:
    argv = lab.pod_exec_argv(pod.node, pod.name, [sys.executable, "-c", ASK, address, str(port)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True).stdout.strip()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pods_on_different_nodes_talk_through_the_tunnel_with_their_own_addresses(lab: Lab, backend: str) -> None:
    """Dual-stack (underlay, overlay and pods), so that both families' pod networks are tested on both data planes
    (kernel WireGuard in the QEMU VM) without another lab."""
    lab.up(3, backend=backend, lease_ttl=TTL, resync_interval=2, timeout=120, pods=1, underlay="dual", overlay="dual")
    pods = lab.pods()
    assert len(pods) == 3 and len({p.ip.rsplit(".", 1)[0] for p in pods}) == 3, f"one subnet per node: {pods}"
    assert all(len(p.ips) == 2 and ":" in p.ips[1] for p in pods), pods
    servers = [
        subprocess.Popen(lab.pod_exec_argv(p.node, p.name, [sys.executable, "-c", ECHO_SOURCE, "7000"])) for p in pods
    ]
    hub = subprocess.Popen(
        [sys.executable, "-c", ECHO_SOURCE, "7001"],
        preexec_fn=in_netns(lab.hub),  # noqa: PLW1509 (one setns call)
    )
    try:
        time.sleep(0.5)
        sniffer = _sniff_underlay(lab, 5)
        time.sleep(0.5)
        # Every pod reaches every pod on the other nodes, over each family, and is seen at its own address (no NAT
        # inside). Under the VM's emulation each ask starts a Python (seconds): there, one pod asks the others.
        askers = pods if backend == "userspace" else pods[:1]
        for source in askers:
            for target in pods:
                if source.node != target.node:
                    for family in (0, 1):
                        seen = _seen_source(lab, source, target.ips[family], 7000)
                        assert seen == source.ips[family], (source, target)
        assert all(ok for *_, ok in lab.ping_pods())
        # An address of the pod network that no node holds goes into the tunnel and no further: the pod network is
        # routed whole (per-node routes let it out by the default route, in the clear).
        taken = {p.ip.rsplit(".", 1)[0] for p in pods}
        stray = next(f"{POD_CIDR_PREFIX}.{i}.9" for i in range(255, 0, -1) if f"{POD_CIDR_PREFIX}.{i}" not in taken)
        send = [sys.executable, "-c", SEND_UDP, stray, "7000"]
        subprocess.run(lab.pod_exec_argv(pods[0].node, pods[0].name, send), check=True, timeout=30)
        assert _mesh_routes(lab, 1) == {str(MeshConfig().pod_networks[0].cidr)}, "the pod network is one route"
        frames = captured(sniffer)
        assert [f for f in frames if f[0] == 17 and 51820 in (f[1], f[2])], "the pods' traffic crossed as WireGuard"
        in_clear = [f for f in frames if f[0] in (1, 58) or 7000 in (f[1], f[2])]  # ICMP, ICMPv6, the echo
        assert not in_clear, f"pod traffic crossed the underlay in the clear: {in_clear}"

        # Leaving the cluster, a pod's traffic is masqueraded behind its node's underlay address, in each family.
        assert _seen_source(lab, pods[0], HUB_ADDRESS, 7001) == lab.underlay_ip(1)
        assert _seen_source(lab, pods[0], HUB_ADDRESS6, 7001) == lab.underlay_ip6(1)

        # Full-size TCP between pods on different nodes: the bridge's MTU is the tunnel's, no black hole.
        a, b = pods[0], pods[1]
        iperf_server = subprocess.Popen(lab.pod_exec_argv(b.node, b.name, ["iperf3", "-s", "-1", "-B", b.ip]))
        time.sleep(0.5)
        client = subprocess.run(
            lab.pod_exec_argv(a.node, a.name, ["iperf3", "-c", b.ip, "-t", "2", "-J"]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        iperf_server.wait(10)
        assert client.returncode == 0, client.stdout[-2000:] + client.stderr
        received = json.loads(client.stdout)["end"]["sum_received"]["bytes"]
        assert received > 1_000_000, received
    finally:
        for process in [*servers, hub]:
            process.kill()
            process.wait()


def test_a_node_keeps_its_pod_subnet_and_repairs_its_pod_network(lab: Lab) -> None:
    lab.up(2, backend="userspace", lease_ttl=TTL, resync_interval=2, timeout=120, pods=1)
    before = {p.node: p.ip for p in lab.pods()}
    conflist = lab.cni_dir(1) / "10-warren-mesh.conflist"
    written = conflist.read_text()
    # Restarted (crash and start), the agent claims nothing new: same subnet, same conflist; pods keep working.
    lab.kill_agent(1, signal.SIGKILL)
    lab.start_agent(1)
    lab.wait_for_agent(1, timeout=STARTUP)
    lab.wait_for_mesh(timeout=30)
    assert conflist.read_text() == written
    assert all(ok for *_, ok in lab.ping_pods())
    # What someone removes by hand is back within a resync: the route to the other node's pods, our nft table,
    # forwarding, the conflist.
    other = next(r for r in _mesh_routes(lab, 1))
    for command in (
        ["ip", "route", "del", other],
        ["nft", "delete", "table", "inet", "warren-mesh"],
        ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"],
    ):
        subprocess.run(["ip", "netns", "exec", lab.node_netns(1), *command], check=True)
    conflist.unlink()
    wait_for(lambda: conflist.exists() and all(ok for *_, ok in lab.ping_pods()), 10, "the pod network repaired")
    assert _mesh_routes(lab, 1) == {other}
    tables = subprocess.run(
        ["ip", "netns", "exec", lab.node_netns(1), "nft", "list", "tables"], capture_output=True, text=True, check=True
    )
    assert "warren-mesh" in tables.stdout
    # A third node joins with a subnet of its own, and the pods already there keep their addresses.
    lab.add_node(3)
    lab.wait_for_agent(3, timeout=STARTUP)
    lab.wait_for_mesh(timeout=30)
    newcomer = lab.add_pod("node-3", "pod-1")
    assert newcomer.ip.rsplit(".", 1)[0] not in {ip.rsplit(".", 1)[0] for ip in before.values()}
    assert {p.node: p.ip for p in lab.pods() if p.node != "node-3"} == before
    assert all(ok for *_, ok in lab.ping_pods())


def _pod_throughput(lab: Lab, source: LabPod, target: LabPod, seconds: float = 2.0) -> float:
    """Bits per second of one full-size TCP stream from ``source`` to ``target`` (iperf3), failing on a black hole."""
    server = subprocess.Popen(
        lab.pod_exec_argv(target.node, target.name, ["iperf3", "-s", "-1", "-B", target.ip]),
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        client = subprocess.run(
            lab.pod_exec_argv(source.node, source.name, ["iperf3", "-c", target.ip, "-t", str(seconds), "-J"]),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
        )
        assert client.returncode == 0, f"{source.name}@{source.node} -> {target.ip}: {client.stdout[-1500:]}"
        return float(json.loads(client.stdout)["end"]["sum_received"]["bits_per_second"])
    finally:
        server.kill()
        server.wait()


def _mtu(lab: Lab, netns: str, interface: str) -> int:
    argv = ["ip", "netns", "exec", netns, "cat", f"/sys/class/net/{interface}/mtu"]
    return int(subprocess.run(argv, capture_output=True, check=False).stdout or 0)


def _conflist_mtu(lab: Lab, index: int) -> int:
    return int(json.loads((lab.cni_dir(index) / "10-warren-mesh.conflist").read_text())["plugins"][0]["mtu"])


def _wait_for_mtu(lab: Lab, nodes: tuple[int, ...], mtu: int, what: str) -> None:
    """Until every node's WireGuard device and CNI config have ``mtu``."""
    wait_for(
        lambda: all(_mtu(lab, lab.node_netns(i), lab.interface(i)) == mtu == _conflist_mtu(lab, i) for i in nodes),
        15,
        what,
    )


@pytest.mark.alone
def test_the_mtu_follows_the_underlay_and_the_mesh_to_the_device_and_new_pods(lab: Lab) -> None:
    """mtu: auto is the underlay's MTU less WireGuard's 60 bytes over IPv4, also when the underlay's MTU changes
    under running agents; an MTU set in the mesh reaches the devices, the CNI config and the pods made after it."""
    lab.up(2, backend="userspace", lease_ttl=TTL, resync_interval=2, timeout=120, pods=1)
    nodes = (1, 2)
    # A link of fixed speed, so that both measurements are bound by the link (as on real nodes), not the CPU.
    for index in nodes:
        lab.set_underlay(index, rate="400mbit")
    assert [_mtu(lab, lab.node_netns(i), lab.interface(i)) for i in nodes] == [1440, 1440]
    assert [_conflist_mtu(lab, i) for i in nodes] == [1440, 1440]
    first = {p.node: p for p in lab.pods()}
    at_1500 = _pod_throughput(lab, first["node-1"], first["node-2"])

    for index in nodes:
        lab.set_underlay(index, mtu=1400)
    _wait_for_mtu(lab, nodes, 1340, "the devices and the CNI configs to follow the underlay's MTU of 1400")
    second = {node: lab.add_pod(node, "pod-2") for node in ("node-1", "node-2")}
    assert _mtu(lab, second["node-1"].netns, "eth0") == 1340
    sniffer = _sniff_underlay(lab, 4)
    time.sleep(0.3)
    at_1400 = _pod_throughput(lab, second["node-1"], second["node-2"])
    frames = captured(sniffer)
    fragments, packets = sum(f[3] for f in frames), len(frames)
    print(f"pod to pod over a 400 Mbit/s link: {at_1500 / 1e6:.0f} Mbit/s at MTU 1500, {at_1400 / 1e6:.0f} at 1400")
    assert packets > 1000 and fragments == 0, f"{fragments} of {packets} packets on the underlay were fragments"
    assert at_1400 >= 0.9 * at_1500, (at_1400, at_1500)
    # Pods made before the change keep their larger MTU: the MSS clamp keeps their connections whole.
    assert _pod_throughput(lab, first["node-1"], first["node-2"], seconds=1.0) >= 0.5 * at_1500

    # An MTU set in the mesh wins over auto: the devices, the CNI configs and the next pods take it.
    config = MeshConfig(mtu=1300).to_json()
    _etcdctl(lab, "put", "/warren/mesh/v1/config", value=json.dumps(config).encode())
    _wait_for_mtu(lab, nodes, 1300, "the devices and the CNI configs to take the mesh's MTU")
    third = lab.add_pod("node-2", "pod-3")
    assert _mtu(lab, third.netns, "eth0") == 1300
    assert _pod_throughput(lab, second["node-1"], third, seconds=1.0) > 0
    assert all(ok for *_, ok in lab.ping_pods())


def _cli_in_hub(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """warren-mesh as the admin, from the hub's namespace (where etcd listens)."""
    return subprocess.run(
        ["ip", "netns", "exec", lab.hub, sys.executable, "-m", "warren_mesh.cli", *args],
        env={**os.environ, **lab.access().env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_external_member_joins_with_the_file_wg_quick_takes(lab: Lab, tmp_path: Path) -> None:
    """A laptop on the hub's network, outside the mesh, brings up the file `peer add` printed with Debian's
    wg-quick (the official tool; the WireGuard apps import the same file) and reaches a node and a pod."""
    lab.up(2, backend="userspace", lease_ttl=TTL, resync_interval=2, timeout=120, pods=1)
    added = _cli_in_hub(lab, "peer", "add", "laptop")
    assert added.returncode == 0, added.stderr
    interface = f"{lab.prefix}lap"  # wg-quick names the interface after the file
    conf = tmp_path / f"{interface}.conf"
    conf.write_text(added.stdout)
    conf.chmod(0o600)
    stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=False)
    assert stripped.returncode == 0 and "PrivateKey" in stripped.stdout and "Address" not in stripped.stdout
    laptop = f"{lab.prefix}-laptop"
    netns.create(laptop)
    try:
        netns.veth(f"{lab.prefix}lapv", f"{lab.prefix}laph", ns=laptop, peer_ns=lab.hub)
        netns.attach(f"{lab.prefix}laph", lab.bridge, ns=lab.hub)
        netns.address(f"{lab.prefix}lapv", f"{SUBNET.network_address + 200}/{SUBNET.prefixlen}", ns=laptop)
        up = subprocess.run(
            ["ip", "netns", "exec", laptop, "wg-quick", "up", str(conf)],
            # No kernel module here: wg-quick starts wireguard-go itself, as on macOS.
            env={**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert up.returncode == 0, up.stderr
        node_address = lab.status()[0].overlay_ips[0]
        pod = lab.pods()[0]
        for target in (str(node_address), pod.ip):
            ping = ["ip", "netns", "exec", laptop, "ping", "-c", "1", "-W", "2", target]
            wait_for(
                lambda ping=ping: subprocess.run(ping, capture_output=True, check=False).returncode == 0,
                15,
                f"the laptop to reach {target} through the mesh",
            )
        # What the nodes hold for it is what showconf says they should.
        shown = json.loads(_cli_in_hub(lab, "showconf", "node", "node-1", "--output", "json").stdout)
        device = lab.device(1)
        assert {p["public_key"] for p in shown["peers"]} == set(device)
    finally:
        subprocess.run(["ip", "netns", "exec", laptop, "wg-quick", "down", str(conf)], capture_output=True, check=False)
        netns.remove(laptop)
        Path(f"/var/run/wireguard/{interface}.name").unlink(missing_ok=True)
        uapi.socket_path(interface).unlink(missing_ok=True)


def _edge(dot: str, a: str, b: str) -> str:
    return next(line for line in dot.splitlines() if f'"{a}" -- "{b}"' in line or f'"{b}" -- "{a}"' in line)


def test_the_graph_shows_every_edge_and_a_dead_nodes_edges_turn_stale(lab: Lab) -> None:
    lab.up(3, backend="userspace", lease_ttl=TTL, resync_interval=2, timeout=120)
    wait_for(lambda: "darkgreen" in lab.graph().decode(), 20, "the agents' throughput windows to have samples")
    dot = lab.graph().decode()
    assert all(
        "darkgreen" in _edge(dot, a, b) for a, b in (("node-1", "node-2"), ("node-1", "node-3"), ("node-2", "node-3"))
    )
    svg = lab.graph(fmt="svg")
    assert b"<svg" in svg and b"node&#45;3" in svg  # Graphviz took the DOT (and escapes the dash)

    # node-3's WireGuard dies (a firewall drops it; its agent keeps its lease, so it stays in the mesh). node-1
    # and node-2 start new sessions (their wireguard-go restarted); with node-3 none can be made.
    subprocess.run(
        ["ip", "netns", "exec", lab.node_netns(3), "nft", "-f", "-"],
        input="table inet dead {\n chain in {\n  type filter hook input priority 0;\n  udp dport 51820 drop\n }\n}\n",
        text=True,
        check=True,
    )
    for index in (1, 2):
        subprocess.run(["pkill", "-f", f"wireguard-go -f {lab.interface(index)}$"], check=True)
    wait_for(
        lambda: "darkgreen" in _edge(lab.graph(stale_after=60).decode(), "node-1", "node-2"),
        30,
        "node-1 and node-2 to handshake again",
    )
    dot = lab.graph(stale_after=60).decode()
    assert "red" in _edge(dot, "node-1", "node-3") and "red" in _edge(dot, "node-2", "node-3"), dot
    assert "node-1: no handshake" in _edge(dot, "node-1", "node-3")
    assert "darkgreen" in _edge(dot, "node-1", "node-2")


@pytest.mark.alone
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_node_rotates_its_key_while_traffic_flows(lab: Lab, backend: str) -> None:
    """docs/key-rotation.md: node-2 gets a new key on request while every pair exchanges 200 datagrams a second;
    no pair loses more than half a second of them, node-1 and node-3 see no change between them, and the old
    private key is gone from node-2's disk. On kernel WireGuard (in the TCG VM, tens of times slower) the probe is
    gentler and the bound is 2 s: what the design must rule out is WireGuard's 5 s handshake retry."""
    lab.up(3, backend=backend, lease_ttl=TTL, resync_interval=2, timeout=120)
    rate, longest = (200, 500) if backend == "userspace" else (20, 2000)
    key_file = lab.state_dir / "node-2.key"
    old_private, old_public = key_file.read_text(), lab.public_key(2)
    keys = {i: lab.public_key(i) for i in (1, 3)}
    # What node-1 and node-3 hold for each other. (Not their handshake times: a lab's first handshakes can still be
    # settling, two initiations crossing and one retried 5 s later, which is WireGuard's business, not ours.)
    between_1_and_3 = (lab.peer_config(1)[keys[3]], lab.peer_config(3)[keys[1]])
    nodes = {n.name: (n.netns, n.overlay_ips[0]) for n in lab.status()}
    probe = Probe(nodes, rate=rate, seconds=8)
    probe.start()
    try:
        time.sleep(3)  # the probes' start, and two seconds of traffic before
        lab.rotate_key("node-2")
        wait_for(lambda: lab.public_key(2) != old_public, 15, "node-2's device to take its new key")
        new_public = lab.public_key(2)
        wait_for(
            lambda: all(new_public in lab.device(i) and old_public not in lab.device(i) for i in (1, 3)),
            10,
            "node-1 and node-3 to move to node-2's new key",
        )
        pairs = probe.results()
    finally:
        probe.stop()
    print("rotation, per directed pair (loss, longest gap ms):", pairs)
    for (source, target), (loss, gap) in pairs.items():
        assert gap <= longest and loss * 8 <= longest / 1000, (source, target, loss, gap)
        if "node-2" not in (source, target):
            assert loss == 0 and gap < longest * 0.4, (source, target, loss, gap)
    # Untouched: nothing changed between node-1 and node-3 (and above: not one datagram lost between them).
    assert (lab.peer_config(1)[keys[3]], lab.peer_config(3)[keys[1]]) == between_1_and_3
    # The key file holds the new key only; the old one is nowhere on disk next to it.
    assert key_file.read_text() != old_private and not (lab.state_dir / "node-2.key.next").exists()
    assert key_file.stat().st_mode & 0o777 == 0o600
    metrics = _metrics(lab, 2)
    assert "warren_mesh_key_rotations_total 1.0" in metrics and new_public in metrics
    # A request acted on is not acted on again (the agent restarted, the request still in etcd).
    lab.kill_agent(2, signal.SIGTERM)
    lab.start_agent(2)
    lab.wait_for_agent(2, timeout=STARTUP)
    time.sleep(3)
    assert lab.public_key(2) == new_public
    assert all(ok for *_, ok in lab.ping_all())
    # SIGHUP: another key, at once.
    lab.signal_agent(2, signal.SIGHUP)
    wait_for(lambda: lab.public_key(2) not in ("", new_public), 15, "node-2 to rotate on SIGHUP")
    wait_for(lambda: all(ok for *_, ok in lab.ping_all()), 10, "the mesh to carry on with node-2's third key")


def _endpoint_of(lab: Lab, index: int, public_key: str) -> str:
    argv = ["ip", "netns", "exec", lab.node_netns(index), "wg", "show", lab.interface(index), "endpoints"]
    lines = subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()
    return next((line.split("\t")[1] for line in lines if line.startswith(public_key)), "")


def test_nodes_behind_nat_are_found_where_their_peers_see_them(lab: Lab) -> None:
    """docs/nat.md: node-2 and node-3 each behind a NAT of their own (port kept, nothing unsolicited let in),
    knowing only their private addresses: every pair handshakes and pings, the two behind NAT through what node-1
    saw of them; a NAT that forgets its mappings and picks another port heals in seconds; so does a restart."""
    lab.up(3, backend="userspace", lease_ttl=TTL, resync_interval=2, timeout=120, pods=1, nat=["node-2", "node-3"])
    assert all(ok for *_, ok in lab.ping_all()) and all(ok for *_, ok in lab.ping_pods())
    keys = {i: lab.public_key(i) for i in (1, 2, 3)}
    # Between the two behind NAT, each dials the other's NAT: the endpoint node-1 saw, now in their records.
    assert _endpoint_of(lab, 2, keys[3]) == f"{lab.underlay_ip(3)}:51820"
    assert _endpoint_of(lab, 3, keys[2]) == f"{lab.underlay_ip(2)}:51820"
    # node-2's NAT forgets everything and maps it to another port from now on.
    lab.rebind_nat(2, 40002)
    started = time.monotonic()
    # Found once node-1's view of it has won for endpoints.ADOPT_AFTER (so that honest observers can outvote a lie
    # before it is taken), and the next handshake went through.
    heal = endpoints.ADOPT_AFTER + 20
    wait_for(lambda: all(ok for *_, ok in lab.ping_all()), heal, "the mesh to find node-2 behind its new port")
    took = time.monotonic() - started
    print(f"healed from a NAT rebinding in {took:.1f} s")
    assert _endpoint_of(lab, 1, keys[2]) == _endpoint_of(lab, 3, keys[2]) == f"{lab.underlay_ip(2)}:40002"
    # A restarted agent keeps the endpoint it learnt (its record says it): no gap for its peers.
    lab.kill_agent(2, signal.SIGKILL)
    lab.start_agent(2)
    lab.wait_for_agent(2, timeout=STARTUP)
    for _ in range(6):
        assert all(ok for *_, ok in lab.ping_all())
        time.sleep(0.5)
    assert _endpoint_of(lab, 3, keys[2]) == f"{lab.underlay_ip(2)}:40002"
    assert all(ok for *_, ok in lab.ping_pods())


def _etcd_get(lab: Lab, key: str) -> bytes:
    """A key's value from the lab's etcd, read as the admin (b"" when absent)."""
    done = subprocess.run(
        ["ip", "netns", "exec", lab.hub, *lab.access().etcdctl("get", "--print-value-only", key)],
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        check=True,
    )
    return done.stdout.strip()


def test_one_lying_observer_among_honest_ones_moves_no_endpoint(lab: Lab) -> None:
    """docs/nat.md#trust, as an attacker holding one node's own credential (a node certificate and its per-node
    role, nothing more): its record says node-1 is seen at 203.0.113.66:4444. The mesh is idle from then on, so
    the three honest observers hear node-1 only by poking it (its WireGuard answers with a keepalive); they
    confirm its endpoint before the lie could be taken, node-1 keeps its endpoint and every peer keeps dialling it
    there. (Before, the lie moved node-1 within 2 s: observers that saw a node where its record says published
    nothing.)"""
    lab.up(4, backend="userspace", lease_ttl=TTL, timeout=120)
    record_key = "/warren/mesh/v1/nodes/node-1"
    before = json.loads(_etcd_get(lab, record_key))
    key1 = before["public_key"]
    assert all(ok for *_, ok in lab.ping_all())
    # The attacker: a node of its own name, enrolled as any node is, writing only its own record.
    pki.issue_node(lab.pki_dir, "evil")
    subprocess.run(
        [sys.executable, "-m", "warren_mesh.cli", "etcd-auth", "add-node", "evil", *lab.access().flags()],
        preexec_fn=in_netns(lab.hub),
        capture_output=True,
        check=True,
    )
    lie = {
        "schema": 1,
        "name": "evil",
        "public_key": NodeKey.generate().public_key,
        "endpoint": "192.0.2.99:51820",
        "overlay_ip": "10.96.0.250",
        "listen_port": 51820,
        "published_at": time.time(),
        "observed_endpoints": {"node-1": "203.0.113.66:4444"},
    }
    evil = lab.pki_dir / "node-evil"
    put = ["etcdctl", f"--endpoints={lab.etcd_endpoint}", f"--cacert={lab.pki_dir / 'ca.pem'}"]
    put += [f"--cert={evil}.pem", f"--key={evil}-key.pem", "put", "/warren/mesh/v1/nodes/evil"]
    subprocess.run(
        ["ip", "netns", "exec", lab.hub, *put],
        input=json.dumps(lie).encode(),
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        check=True,
    )
    lied = time.monotonic()
    hold = endpoints.ADOPT_AFTER

    def confirmations() -> int:
        records = [json.loads(_etcd_get(lab, f"/warren/mesh/v1/nodes/node-{i}")) for i in (2, 3, 4)]
        return sum(r.get("observed_endpoints", {}).get("node-1") == before["endpoint"] for r in records)

    first = every = None  # seconds after the lie until one, and all three, honest observers confirmed
    while (waited := time.monotonic() - lied) < hold + 5:
        assert json.loads(_etcd_get(lab, record_key))["endpoint"] == before["endpoint"], f"moved after {waited:.0f} s"
        assert all(_endpoint_of(lab, i, key1) == before["endpoint"] for i in (2, 3, 4))
        confirmed = confirmations()
        first = waited if first is None and confirmed else first
        every = waited if every is None and confirmed == 3 else every
        time.sleep(1)
    print(
        f"honest confirmations of node-1's endpoint: the first {first} s, all three {every} s after the lie "
        f"(an endpoint is taken after {hold:.0f} s of winning)"
    )
    # One confirmation against one lie is a tie, which keeps the record's endpoint.
    assert first is not None and first < hold and every is not None
    assert all(ok for *_, ok in lab.ping_all())


# One node's credential rewriting its own (valid) record as fast as etcd takes it: a new endpoint port each time,
# so every agent would have a peer to update on its device for each write it applies.
_FLOOD = """
import asyncio, json, sys, time
from pathlib import Path
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.store.etcd import EtcdStore
endpoint, ca, cert, key, seconds, public_key, joiner = sys.argv[1:8]
async def watch(store, lags):
    # A bare watcher beside the flood: when the joiner's record reaches it (etcd's delivery under the flood).
    async for result in store.observe("/warren/mesh/v1/nodes/"):
        kvs = result.items if hasattr(result, "items") else [e.kv for e in result.events if e.kind == "put"]
        for kv in kvs:
            if kv.key.endswith("/" + joiner) and not lags:
                lags.append(time.time() - json.loads(kv.value)["published_at"])
                return
async def main():
    tls = EtcdTls(Path(ca), Path(cert), Path(key))
    store, watcher, lags = EtcdStore(endpoint, tls=tls), EtcdStore(endpoint, tls=tls), []
    watching = asyncio.ensure_future(watch(watcher, lags))
    await store.put("/warren/mesh/v1/claims/evil/overlay/10.96.0.250", b"")
    writes, end = 0, time.monotonic() + float(seconds)
    while time.monotonic() < end:
        doc = {"schema": 1, "name": "evil", "public_key": public_key, "endpoint": f"192.0.2.99:{1000 + writes % 60000}",
               "overlay_ip": "10.96.0.250", "listen_port": 51820, "published_at": time.time()}
        await store.put("/warren/mesh/v1/nodes/evil", json.dumps(doc).encode())
        writes += 1
    try:
        await asyncio.wait_for(watching, 30)
    finally:
        await store.close()
        await watcher.close()
    print(writes / float(seconds), lags[0])
asyncio.run(main())
"""


def _join_lag(lab: Lab, index: int, observers: list[int]) -> dict[str, float]:
    """Seconds from node ``index``'s record being published until each of ``observers`` applied it to its device
    (its agent's log line, written as the change is applied), by observer."""
    name = lab.node_name(index)
    published = json.loads(_etcd_get(lab, f"/warren/mesh/v1/nodes/{name}"))["published_at"]
    applied = {}
    for observer in observers:
        log_file = lab.state_dir / f"{lab.node_name(observer)}.log"

        def added(log_file: Path = log_file) -> float | None:
            stamp = None
            for line in log_file.read_text(errors="replace").splitlines():
                if stamp is None and line[:4].isdigit():
                    last = line
                if line.startswith(f"add peer {name}:") and stamp is None:
                    stamp = time.mktime(time.strptime(last[:19], "%Y-%m-%d %H:%M:%S")) + int(last[20:23]) / 1000
            return stamp

        applied[lab.node_name(observer)] = wait_for(added, 30, f"{lab.node_name(observer)} adding {name}") - published
    return applied


def _log_between(log_file: Path, until: str, *, seconds: float) -> str:
    """The lines of an agent's log in the ``seconds`` before the first line starting with ``until``, that one
    included (what the agent was doing while a change waited)."""
    lines = log_file.read_text(errors="replace").splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(until))
    stamped = [i for i in range(end) if lines[i][:4].isdigit()]
    last = time.mktime(time.strptime(lines[stamped[-1]][:19], "%Y-%m-%d %H:%M:%S")) if stamped else 0
    start = next(
        (i for i in stamped if time.mktime(time.strptime(lines[i][:19], "%Y-%m-%d %H:%M:%S")) >= last - seconds), end
    )
    return "\n".join(lines[start : end + 1])[-20000:]


def _cpu_seconds(lab: Lab, indexes: list[int]) -> float:
    """CPU time used so far by every process in these nodes' namespaces (agents and wireguard-go)."""
    ticks = 0
    for index in indexes:
        for pid in netns.pids_in(lab.node_netns(index)):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _updates_of(lab: Lab, index: int, name: str) -> int:
    log_file = lab.state_dir / f"{lab.node_name(index)}.log"
    return log_file.read_text(errors="replace").count(f"update peer {name}:")


@pytest.mark.alone
def test_a_node_flooding_its_record_does_not_slow_anyone_elses_join(lab: Lab) -> None:
    """Issue 28: one node's credential rewriting its own valid record as fast as etcd takes it (a new endpoint
    each time). Before, every agent followed every rewrite, a device update each (on wireguard-go a UAPI call):
    ~270 a second on every node. Now a node's updates past a burst of 10 are applied at 2 a second, the newest
    winning: the others' joins keep their latency, the nodes' CPU goes to their own work, and when the flood ends
    every device has the flooder's last record."""
    lab.up(3, backend="userspace", lease_ttl=TTL, timeout=120)
    lab.add_node(4)
    lab.wait_for_mesh(timeout=60)
    quiet = max(_join_lag(lab, 4, [1, 2, 3]).values())
    pki.issue_node(lab.pki_dir, "evil")
    lab._admin("etcd-auth", "add-node", "evil")
    evil = lab.pki_dir / "node-evil"
    seconds = 10
    cpu_before, started = _cpu_seconds(lab, [1, 2, 3, 4]), time.monotonic()
    flood = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FLOOD,
            lab.etcd_endpoint,
            str(lab.pki_dir / "ca.pem"),
            f"{evil}.pem",
            f"{evil}-key.pem",
            str(seconds),
            NodeKey.generate().public_key,
            lab.node_name(5),
        ],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=in_netns(lab.hub),  # noqa: PLW1509 (one setns call)
    )
    try:
        time.sleep(3)
        lab.add_node(5)
        lab.wait_for_agent(5, timeout=STARTUP)
        lags = _join_lag(lab, 5, [1, 2, 3, 4])
    finally:
        out, _ = flood.communicate(timeout=90)
    rate, floor = map(float, out.split())
    flooded = max(lags.values())
    cpu = (_cpu_seconds(lab, [1, 2, 3, 4]) - cpu_before) / (time.monotonic() - started)
    last = json.loads(_etcd_get(lab, "/warren/mesh/v1/nodes/evil"))
    updates = [_updates_of(lab, i, "evil") for i in (1, 2, 3, 4)]
    print(
        f"join lag quiet {quiet * 1000:.0f} ms, during a flood of {rate:.0f} writes/s {flooded * 1000:.0f} ms (a bare"
        f" watcher's {floor * 1000:.0f} ms); evil's updates applied per node {updates} in {seconds} s; nodes 1-4 used"
        f" {cpu:.2f} CPU meanwhile; the join's lag by node (ms): { {n: round(s * 1000) for n, s in lags.items()} }"
    )
    # A quiet join reaches every device in 5-10 ms, and log lines carry milliseconds: within 2x, or 100 ms of
    # slack where 2x is below what the clock resolves, beyond what the flood's load on etcd and the CPUs costs a
    # bare watcher of the same records in the same run (11-72 ms seen on an Intel Xeon; 122 ms on a slower AMD
    # EPYC failed a bound without that floor).
    slowest = max(lags, key=lags.__getitem__)
    assert flooded <= floor + max(2 * quiet, quiet + 0.1), f"{slowest}'s log meanwhile:\n" + _log_between(
        lab.state_dir / f"{slowest}.log", f"add peer {lab.node_name(5)}:", seconds=flooded + 1
    )
    assert max(updates) <= damping.BURST + damping.RATE * (seconds + 5), "the flood was followed, not damped"
    wait_for(
        lambda: all(lab.peer_config(i).get(last["public_key"], ("",))[0] == last["endpoint"] for i in (1, 2, 3, 4)),
        10,
        "every device with the flooder's last record",
    )
