"""Command line: ``warren-mesh agent | operator | status | demo | lab (up | status | exec | ping | down)``.

Errors a user can cause (a bad flag, an unreadable key file, a name taken by another node, etcd away when a
one-shot command needs it) end in one line naming the fix and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from warren_mesh import __version__
from warren_mesh.admin import graph as graph_module
from warren_mesh.admin import peers, showconf
from warren_mesh.admin.migration import migrate_reservations
from warren_mesh.admin.status import read_agent_traffic, read_status, read_view, render_json, render_table
from warren_mesh.agent.app import Agent
from warren_mesh.agent.parts import node_parts
from warren_mesh.enroller.client import EnrolmentError, EnrolmentRequest, enroll, keep_enrolled
from warren_mesh.enroller.identity import AgentIdentity
from warren_mesh.host.underlay import UnderlayError
from warren_mesh.identity import pki
from warren_mesh.identity.keys import KeyFileError
from warren_mesh.identity.keys import load as load_key
from warren_mesh.lab.cni_runtime import CniError
from warren_mesh.lab.demo import run_demo
from warren_mesh.lab.lab import Lab, LabError, require_root
from warren_mesh.lab.report import pods_json, render_lab_table, render_pods_table, status_json
from warren_mesh.mesh.allocation import AddressSpaceExhausted, RegistrationConflict
from warren_mesh.metrics.reading import read_agent_metrics
from warren_mesh.settings import (
    AgentSettings,
    OperatorSettings,
    SettingsError,
    StoreSettings,
    add_flag,
    add_store_flags,
)
from warren_mesh.store import roles
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.testkit.etcd_server import EtcdServerError
from warren_mesh.trust.fields import validate_name
from warren_mesh.trust.reasons import RecordError
from warren_mesh.values.netaddr import parse_listen_address
from warren_mesh.wireguard import runner
from warren_mesh.wireguard.backend import BackendError

log = logging.getLogger("warren_mesh")

_USER_ERRORS = (
    SettingsError,
    showconf.ShowconfError,
    graph_module.GraphError,
    peers.PeerError,
    RecordError,  # a name given on the command line that is no node name
    pki.PkiError,
    KeyFileError,
    RegistrationConflict,
    AddressSpaceExhausted,
    UnderlayError,
    StoreError,
    EtcdServerError,
    LabError,
    CniError,
    BackendError,
    PermissionError,
    EnrolmentError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warren-mesh", description="WireGuard mesh control plane on etcd.")
    parser.add_argument("--version", action="version", version=f"warren-mesh {__version__}")
    add_flag(parser, "--log-level", "info", "debug, info, warning or error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="run the node agent")
    AgentSettings.add_arguments(agent)
    agent.add_argument("--cleanup-on-exit", action="store_true", help="remove the WireGuard device on exit")

    wireguard_go = commands.add_parser(
        "wireguard-go",
        help="run the node's wireguard-go for an agent with --wireguard-go-runner external (idle where the kernel "
        "has WireGuard)",
    )
    add_flag(wireguard_go, "--interface", "wg-mesh", "WireGuard interface name (the agent's)")
    add_flag(wireguard_go, "--backend", "auto", "auto (the kernel's WireGuard if it has it) or userspace")
    add_flag(wireguard_go, "--wireguard-go", None, "wireguard-go binary (default: from PATH)")

    status = commands.add_parser("status", help="show the mesh as registered in etcd")
    add_store_flags(status)
    status.add_argument("--output", choices=("table", "json"), default="table")
    status.add_argument(
        "--agent-metrics",
        default="http://127.0.0.1:9587/metrics",
        help="this node's agent's /metrics, for per-peer throughput columns (empty: skip; unreachable: left out)",
    )

    operator = commands.add_parser(
        "operator", help="run the Kubernetes operator: Mesh/MeshPeer -> etcd, registrations -> MeshNodes"
    )
    OperatorSettings.add_arguments(operator)

    certs = commands.add_parser("certs", help="a CA and certificates for etcd, the operator and the nodes")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="CERTS_COMMAND")
    certs_init = certs_commands.add_parser("init", help="create the CA, etcd's certificate, the admin's and operator's")
    certs_init.add_argument(
        "--etcd-name", action="append", required=True, help="a DNS name or IP address of etcd (repeat for each)"
    )
    certs_node = certs_commands.add_parser("node", help="a client certificate for one node (CN node-NAME)")
    certs_node.add_argument("name")
    certs_enroller = certs_commands.add_parser("enroller", help="the enroller's HTTPS server certificate")
    certs_enroller.add_argument(
        "--name", action="append", required=True, help="a DNS name or IP address agents reach it at (repeat)"
    )
    certs_renew = certs_commands.add_parser("renew", help="renew a node's certificate if it expires soon")
    certs_renew.add_argument("name")
    certs_renew.add_argument("--within-days", type=int, default=pki.RENEW_WITHIN_DAYS)
    for sub in (certs_init, certs_node, certs_enroller, certs_renew):
        sub.add_argument("--dir", required=True, type=Path, help="the PKI directory (keys are written 0600)")

    etcd_auth = commands.add_parser(
        "etcd-auth", help="etcd users and roles: each node may write only its own keys (run as etcd's root)"
    )
    etcd_auth_commands = etcd_auth.add_subparsers(dest="etcd_auth_command", required=True, metavar="AUTH_COMMAND")
    auth_setup = etcd_auth_commands.add_parser(
        "setup", help="root, the operator and the given nodes, then turn etcd's auth on (idempotent)"
    )
    auth_setup.add_argument("--node", action="append", default=[], help="a node name (repeat for each)")
    auth_node = etcd_auth_commands.add_parser("add-node", help="the user and role of one more node")
    auth_node.add_argument("name")
    for sub in (auth_setup, auth_node):
        add_store_flags(sub)

    enroller = commands.add_parser(
        "enroller", help="sign each agent pod's etcd certificate for its own node (TokenReview; holds the CA key)"
    )
    add_store_flags(enroller)
    add_flag(enroller, "--listen-address", "0.0.0.0:9443", "HOST:PORT of the HTTPS endpoint")
    add_flag(enroller, "--pki-dir", None, "directory with the mesh CA (ca.pem, ca-key.pem)")
    add_flag(enroller, "--tls-cert-file", None, "the enroller's server certificate (of the mesh CA)")
    add_flag(enroller, "--tls-key-file", None, "its key")
    add_flag(enroller, "--agent-namespace", "warren-mesh", "namespace of the agent pods")
    add_flag(enroller, "--agent-service-account", "warren-mesh-agent", "service account of the agent pods")
    add_flag(enroller, "--token-audience", "warren-mesh", "audience of the agents' projected tokens")

    enroll = commands.add_parser(
        "enroll", help="get this node's etcd certificate from the enroller (key made here; renews when due)"
    )
    add_flag(enroll, "--enroller", None, "https:// URL of the enroller")
    add_flag(enroll, "--enroller-ca-file", None, "the mesh CA, which signed the enroller's certificate")
    add_flag(
        enroll,
        "--enroller-address",
        None,
        "connect to this address instead of resolving --enroller's host (its Service's ClusterIP, there before "
        "cluster DNS is); the certificate is still checked for that host name",
    )
    add_flag(enroll, "--token-file", "/var/run/secrets/warren-mesh/token", "the pod's projected token")
    add_flag(enroll, "--dir", "/var/lib/warren-mesh/etcd", "where node.pem, node-key.pem (0600) and ca.pem go")
    add_flag(enroll, "--node-name", None, "the node this pod runs on: refused if the API server says otherwise")
    enroll.add_argument("--renew-within-days", type=int, default=pki.RENEW_WITHIN_DAYS)
    enroll.add_argument(
        "--watch", action="store_true", help="keep running: renew when due (a sidecar next to the agent)"
    )
    enroll.add_argument("--check-interval", type=float, default=3600.0, help="seconds between looks with --watch")

    showconf = commands.add_parser("showconf", help="WireGuard configurations computed from etcd")
    showconf_commands = showconf.add_subparsers(dest="showconf_command", required=True, metavar="WHAT")
    showconf_peer = showconf_commands.add_parser("peer", help="a wg-quick file for an external member (a laptop)")
    showconf_peer.add_argument("name")
    showconf_peer.add_argument("--private-key-file", help="the member's private key, put into the file")
    showconf_peer.add_argument("--dns", action="append", default=[], help="a DNS server for the file (repeatable)")
    showconf_node = showconf_commands.add_parser("node", help="what a node's device should hold (cf. wg showconf)")
    showconf_node.add_argument("name")
    for showconf_parser in (showconf_peer, showconf_node):
        add_store_flags(showconf_parser)
        showconf_parser.add_argument("--output", choices=("conf", "json"), default="conf")
    rotate = commands.add_parser(
        "rotate-key", help="ask a node's agent for a new WireGuard key (it moves its peers over without a gap)"
    )
    rotate.add_argument("--node", required=True, help="the node; only its agent acts on the request")
    add_store_flags(rotate)
    graph = commands.add_parser("graph", help="the mesh as a picture: Graphviz DOT, or svg/png through Graphviz")
    add_store_flags(graph)
    graph.add_argument(
        "--agent-metrics",
        action="append",
        help="an agent's /metrics URL, for handshake ages and throughput on its edges (repeatable; default: this "
        "node's agent, http://127.0.0.1:9587/metrics, if it answers)",
    )
    graph.add_argument("--format", choices=graph_module.FORMATS, default="dot")
    graph.add_argument("--output", help="the file to write (default: standard output)")
    graph.add_argument(
        "--stale-after",
        type=float,
        default=graph_module.DEFAULT_STALE_AFTER,
        help="seconds without a handshake after which an edge is stale (red; default 180, WireGuard's own limit)",
    )
    peer = commands.add_parser("peer", help="external members of a mesh without Kubernetes (else: MeshPeer)")
    peer_commands = peer.add_subparsers(dest="peer_command", required=True, metavar="PEER_COMMAND")
    peer_add = peer_commands.add_parser(
        "add", help="a member with a new key and a free mesh address; prints its wg-quick file (with the key)"
    )
    peer_add.add_argument("name")
    peer_add.add_argument(
        "--allowed-ip", action="append", default=[], help="a network behind the member, routed to it (repeatable)"
    )
    peer_add.add_argument("--keepalive", type=int, default=None, help="its persistent keepalive (default: the mesh's)")
    peer_add.add_argument("--dns", action="append", default=[], help="a DNS server for the file (repeatable)")
    peer_remove = peer_commands.add_parser("remove", help="remove a member: every node drops it at once")
    peer_remove.add_argument("name")
    for peer_parser in (peer_add, peer_remove):
        add_store_flags(peer_parser)

    migrate = commands.add_parser(
        "migrate-claims", help="move ipam/ reservations to node-owned claims (before etcd's auth is turned on)"
    )
    add_store_flags(migrate)

    demo = commands.add_parser("demo", help="start a local etcd and N agents (memory backend); print the mesh")
    demo.add_argument("--nodes", type=int, default=3, help="number of agents (default 3)")

    lab = commands.add_parser("lab", help="a local mesh in network namespaces with real WireGuard (root)")
    lab_commands = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    up = lab_commands.add_parser("up", help="start etcd and N nodes, wait until every pair has handshaken")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--backend", choices=("auto", "kernel", "userspace"), default="auto")
    up.add_argument("--lease-ttl", type=int, default=5, help="seconds a dead node lingers (default 5)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the full mesh")
    up.add_argument("--no-tls", action="store_true", help="plain http to etcd, no certificates (TLS is the default)")
    up.add_argument("--pods", type=int, default=1, help="pods per node, on the mesh's CNI network (default 1)")
    up.add_argument("--wireguard-go", help="wireguard-go binary of the userspace backend (default: from PATH)")
    up.add_argument(
        "--nat", default="", help="nodes behind a NAT of their own, comma-separated (node-2,node-3): see docs/nat.md"
    )
    lab_env = lab_commands.add_parser(
        "env", help='export lines pointing commands at the lab\'s etcd: eval "$(warren-mesh lab env)"'
    )
    lab_env.add_argument("--node", help="a node's credentials instead of the admin's (node-1, ...)")
    lab_status = lab_commands.add_parser("status", help="nodes, addresses, peers and handshakes")
    lab_status.add_argument("--output", choices=("table", "json"), default="table")
    lab_exec = lab_commands.add_parser("exec", help="run a command inside a node: lab exec node-1 -- ping ...")
    lab_exec.add_argument("node")
    lab_exec.add_argument("cmd", nargs=argparse.REMAINDER)
    lab_commands.add_parser("ping", help="ping every node's overlay address, and every pod, from every other node")
    lab_pod = lab_commands.add_parser("pod", help="pods: network namespaces on a node's CNI network")
    pod_commands = lab_pod.add_subparsers(dest="pod_command", required=True, metavar="POD_COMMAND")
    for verb, text in (("add", "start a pod on a node"), ("del", "remove a pod")):
        pod_command = pod_commands.add_parser(verb, help=text)
        pod_command.add_argument("node")
        pod_command.add_argument("pod")
    pod_list = pod_commands.add_parser("list", help="name, node, netns and IP of every pod")
    pod_list.add_argument("--output", choices=("table", "json"), default="table")
    pod_exec = pod_commands.add_parser("exec", help="run a command in a pod: lab pod exec node-1 pod-1 -- ping ...")
    pod_exec.add_argument("node")
    pod_exec.add_argument("pod")
    pod_exec.add_argument("cmd", nargs=argparse.REMAINDER)
    lab_graph = lab_commands.add_parser("graph", help="warren-mesh graph of the lab, with every agent's metrics")
    lab_graph.add_argument("--format", choices=graph_module.FORMATS, default="dot")
    lab_graph.add_argument("--output", help="the file to write (default: standard output)")
    lab_commands.add_parser("down", help="remove everything the lab made")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(
            f"warren-mesh: error: --log-level {args.log_level!r} is not debug, info, warning or error",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "agent":
            return asyncio.run(_agent(AgentSettings.from_args(args)))
        if args.command == "wireguard-go":
            return _wireguard_go(args)
        if args.command == "status":
            return asyncio.run(_status(StoreSettings.from_args(args), args.output, args.agent_metrics))
        if args.command == "operator":
            return asyncio.run(_operator(OperatorSettings.from_args(args)))
        if args.command == "demo":
            if not 2 <= args.nodes <= 50:
                raise SettingsError(f"--nodes {args.nodes} is not between 2 and 50")
            logging.getLogger().setLevel(max(level, logging.WARNING))
            return 0 if asyncio.run(run_demo(args.nodes, sys.stdout)) else 1
        if args.command == "lab":
            return _lab(args)
        if args.command == "certs":
            return _certs(args)
        if args.command == "etcd-auth":
            return asyncio.run(_etcd_auth(StoreSettings.from_args(args), args))
        if args.command == "enroller":
            return asyncio.run(_enroller(StoreSettings.from_args(args), args))
        if args.command == "enroll":
            return _enroll(args)
        if args.command == "showconf":
            return asyncio.run(_showconf(StoreSettings.from_args(args), args))
        if args.command == "rotate-key":
            return asyncio.run(_rotate_key(StoreSettings.from_args(args), args.node))
        if args.command == "graph":
            return asyncio.run(_graph(StoreSettings.from_args(args), args))
        if args.command == "peer":
            return asyncio.run(_peer(StoreSettings.from_args(args), args))
        if args.command == "migrate-claims":
            return asyncio.run(_migrate_claims(StoreSettings.from_args(args)))
    except _USER_ERRORS as exc:
        print(f"warren-mesh: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SettingsError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`warren-mesh status | head`): stop quietly, and keep Python's own flush at exit
        # from failing on the closed pipe too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 2


def _lab(args: argparse.Namespace) -> int:
    lab = Lab()
    require_root()
    if args.lab_command == "up":
        if not 2 <= args.nodes <= 50:
            raise SettingsError(f"--nodes {args.nodes} is not between 2 and 50")
        started = time.monotonic()
        status = lab.up(
            args.nodes,
            backend=args.backend,
            lease_ttl=args.lease_ttl,
            tls=not args.no_tls,
            timeout=args.timeout,
            pods=args.pods,
            wireguard_go=args.wireguard_go,
            nat=[n for n in args.nat.split(",") if n],
            progress=lambda line: print(line, flush=True),
        )
        print(f"full mesh of {len(status)} nodes, every pair handshaken, in {time.monotonic() - started:.1f} s\n")
        print(render_lab_table(status))
        if args.pods:
            print(f"\n{render_pods_table(lab.pods())}")
        print(
            "\nnext: `warren-mesh lab ping`, `warren-mesh lab exec node-1 -- wg show`, `warren-mesh lab pod list`, "
            '`eval "$(warren-mesh lab env)"; warren-mesh status`, `warren-mesh lab down`'
        )
        return 0
    if not lab.is_up() and args.lab_command != "down":
        raise LabError("no lab is up; start one with `warren-mesh lab up`")
    if args.lab_command == "env":
        if args.node is not None and args.node not in {lab.node_name(i) for i in lab.nodes()}:
            raise LabError(f"no node {args.node!r} in this lab")
        print(lab.access().exports(args.node))
        return 0
    if args.lab_command == "status":
        status = lab.status()
        print(status_json(status) if args.output == "json" else render_lab_table(status))
        return 0
    if args.lab_command == "exec":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            raise SettingsError("lab exec needs a command: warren-mesh lab exec node-1 -- ping 10.96.0.2")
        argv = lab.exec_argv(args.node, command)
        os.execvp(argv[0], argv)  # noqa: S606 (replacing ourselves with the user's command is the point)
    if args.lab_command == "pod":
        return _lab_pod(lab, args)
    if args.lab_command == "graph":
        _write_picture(lab.graph(fmt=args.format), args.output)
        return 0
    if args.lab_command == "ping":
        failed = 0
        for what, results in (("overlay", lab.ping_all()), ("pod-to-pod", lab.ping_pods())):
            for source, target, ok in results:
                print(f"{source} -> {target}: {'ok' if ok else 'FAILED'}")
            failed += sum(1 for *_, ok in results if not ok)
            print(f"{sum(1 for *_, ok in results if ok)}/{len(results)} {what} pings answered")
        return 0 if failed == 0 else 1
    removed = lab.down()
    print("\n".join(f"removed {item}" for item in removed) or "nothing to remove")
    return 0


def _lab_pod(lab: Lab, args: argparse.Namespace) -> int:
    if args.pod_command == "add":
        pod = lab.add_pod(args.node, args.pod)
        print(f"{pod.name} on {pod.node}: {pod.ip} (netns {pod.netns})")
    elif args.pod_command == "del":
        lab.delete_pod(args.node, args.pod)
        print(f"removed {args.pod} from {args.node}")
    elif args.pod_command == "list":
        pods = lab.pods()
        print(pods_json(pods) if args.output == "json" else render_pods_table(pods))
    else:
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            raise SettingsError(
                "lab pod exec needs a command: warren-mesh lab pod exec node-1 pod-1 -- ping 10.244.1.2"
            )
        argv = lab.pod_exec_argv(args.node, args.pod, command)
        os.execvp(argv[0], argv)  # noqa: S606 (replacing ourselves with the user's command is the point)
    return 0


async def _agent(settings: AgentSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(settings, node_parts(settings))
    loop.add_signal_handler(signal.SIGHUP, agent.request_key_rotation)
    await agent.run(stop)
    log.info("agent stopped")
    return 0


def _certs(args: argparse.Namespace) -> int:
    """Create or renew certificates; prints the files written, never a key."""
    directory: Path = args.dir
    if args.certs_command == "init":
        written = pki.init(directory, args.etcd_name)
    elif args.certs_command == "node":
        validate_name(args.name)
        written = {args.name: pki.issue_node(directory, args.name)}
    elif args.certs_command == "enroller":
        written = {"enroller": pki.issue(directory, "enroller", pki.ENROLLER_USER, server_names=args.name)}
    else:
        validate_name(args.name)
        renewed = pki.renew_node(directory, args.name, within_days=args.within_days)
        if renewed is None:
            print(f"{pki.node_user(args.name)}.pem is valid for more than {args.within_days} days: not renewed")
            return 0
        written = {args.name: renewed}
    for credential in written.values():
        print(f"wrote {credential.cert} and {credential.key} (0600)")
    return 0


async def _etcd_auth(settings: StoreSettings, args: argparse.Namespace) -> int:
    nodes = [validate_name(name) for name in (args.node if args.etcd_auth_command == "setup" else [args.name])]
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls)
    try:
        auth = EtcdAuth(store)
        if args.etcd_auth_command == "setup":
            await roles.set_up(auth, settings.schema, nodes)
            print(f"etcd auth is on: root, {pki.OPERATOR_USER} and {len(nodes)} node(s) under {settings.schema.root}")
        else:
            await roles.add_node(auth, settings.schema, nodes[0])
            print(f"{pki.node_user(nodes[0])} may write {settings.schema.node(nodes[0])} and its claims")
    finally:
        await store.close()
    return 0


async def _enroller(settings: StoreSettings, args: argparse.Namespace) -> int:
    for flag in ("pki_dir", "tls_cert_file", "tls_key_file"):
        if not getattr(args, flag):
            raise SettingsError(f"--{flag.replace('_', '-')} is required")
    if settings.tls is None:
        raise SettingsError("the enroller creates etcd users: give etcd's root credentials (--etcd-cert-file, ...)")
    host, port = parse_listen_address(args.listen_address)
    identity = AgentIdentity(args.agent_namespace, args.agent_service_account, args.token_audience)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Only the enroller loads aiohttp's server and kopf's login (agents never do).
    from warren_mesh.enroller.server import serve as serve_enroller  # noqa: PLC0415

    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls)
    try:
        await serve_enroller(
            Path(args.pki_dir),
            host=host,
            port=port,
            identity=identity,
            etcd=store,
            schema=settings.schema,
            tls=(Path(args.tls_cert_file), Path(args.tls_key_file)),
            stop=stop,
        )
    finally:
        await store.close()
    return 0


def _enroll(args: argparse.Namespace) -> int:
    if not args.enroller or not args.enroller_ca_file:
        raise SettingsError("--enroller and --enroller-ca-file are required")
    if args.node_name:
        validate_name(args.node_name)
    request = EnrolmentRequest(
        args.enroller,
        ca_file=Path(args.enroller_ca_file),
        token_file=Path(args.token_file),
        directory=Path(args.dir),
        node_name=args.node_name or None,
        renew_within_days=args.renew_within_days,
        address=args.enroller_address or None,
    )
    if args.watch:
        # In a container this is process 1, which the kernel spares from signals it has no handler for: without
        # one, every pod stop would wait out its whole grace period before the kill.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        keep_enrolled(request, check_interval=max(1.0, args.check_interval))
    done = enroll(request)
    if done is None:
        print(f"{Path(args.dir) / 'node.pem'} is valid for more than {args.renew_within_days} days: kept")
    else:
        print(f"wrote {done.cert} for {pki.node_user(done.node)} (key {done.key} stays on this node)")
    return 0


async def _showconf(settings: StoreSettings, args: argparse.Namespace) -> int:
    key = None
    if args.showconf_command == "peer" and args.private_key_file:
        key = load_key(Path(args.private_key_file))
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls, call_timeout=3.0)
    try:
        view = await read_view(store, settings.schema)
    finally:
        await store.close()
    if args.showconf_command == "peer":
        member = showconf.for_peer(view, args.name, private_key=key, dns=args.dns)
    else:
        member = showconf.for_node(view, args.name)
    print(member.render_json() if args.output == "json" else member.render(), end="\n" if args.output == "json" else "")
    return 0


async def _rotate_key(settings: StoreSettings, node: str) -> int:
    validate_name(node)
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls, call_timeout=5.0)
    try:
        schema = settings.schema
        if await store.get(schema.node(node)) is None:
            raise SettingsError(f"no node {node!r} is registered in the mesh")
        await store.put(schema.key_rotation(node), json.dumps({"requested_at": time.time()}).encode())
    finally:
        await store.close()
    print(f"asked {node} for a new key; `warren-mesh status` shows it once published", file=sys.stderr)
    return 0


async def _graph(settings: StoreSettings, args: argparse.Namespace) -> int:
    urls = args.agent_metrics or ["http://127.0.0.1:9587/metrics"]
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls, call_timeout=3.0)
    try:
        view = await read_view(store, settings.schema)
    finally:
        await store.close()
    readings = []
    for url in urls:
        try:
            readings.append(await asyncio.to_thread(read_agent_metrics, url))
        except (OSError, ValueError) as exc:
            # The default (a local agent) is often not there; one the user named is worth a word.
            log.log(logging.WARNING if args.agent_metrics else logging.DEBUG, "no edges from %s: %s", url, exc)
    dot = graph_module.render_dot(view, readings, now=time.time(), stale_after=args.stale_after)
    await asyncio.to_thread(_write_picture, graph_module.draw(dot, args.format), args.output)
    return 0


def _write_picture(picture: bytes, output: str | None) -> None:
    """`graph`'s output: into ``output``, or (None) to standard output, as bytes (a PNG is not text)."""
    if output:
        Path(output).write_bytes(picture)
    else:
        sys.stdout.buffer.write(picture)


async def _peer(settings: StoreSettings, args: argparse.Namespace) -> int:
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls, call_timeout=5.0)
    try:
        if args.peer_command == "remove":
            await peers.remove(store, settings.schema, args.name)
            print(f"removed peer {args.name}", file=sys.stderr)
            return 0
        allowed = []
        for text in args.allowed_ip:
            try:
                allowed.append(ipaddress.ip_network(text))
            except ValueError as exc:
                raise SettingsError(f"--allowed-ip {text!r} is not a network in CIDR form: {exc}") from None
        if args.keepalive is not None and not 0 <= args.keepalive <= 65535:
            raise SettingsError(f"--keepalive {args.keepalive} is not 0-65535 seconds")
        key, address = await peers.add(
            store, settings.schema, args.name, allowed_ips=allowed, persistent_keepalive=args.keepalive
        )
        view = await read_view(store, settings.schema)
    finally:
        await store.close()
    print(f"added peer {args.name} at {address}; its private key is only in the file below", file=sys.stderr)
    print(showconf.for_peer(view, args.name, private_key=key, dns=args.dns).render(), end="")
    return 0


async def _migrate_claims(settings: StoreSettings) -> int:
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls)
    try:
        report = await migrate_reservations(store, settings.schema)
    finally:
        await store.close()
    for line in report.lines() or ["nothing to migrate"]:
        print(line)
    return 1 if report.changed else 0


def _wireguard_go(args: argparse.Namespace) -> int:
    if args.backend not in ("auto", "userspace"):
        raise SettingsError(f"--backend {args.backend!r} is not auto or userspace")
    if not args.interface or len(args.interface) > 15 or "/" in args.interface:
        raise SettingsError(f"--interface {args.interface!r} is not a Linux interface name (1-15 characters)")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    runner.run(args.interface, args.backend, args.wireguard_go or None, stop)
    return 0


async def _operator(settings: OperatorSettings) -> int:
    import kopf  # noqa: PLC0415 (only the operator loads kopf and its handlers; agents never do)

    from warren_mesh.controller import handlers  # noqa: PLC0415 (importing registers the handlers)

    handlers.OPERATOR.etcd_endpoints = settings.etcd_endpoints
    handlers.OPERATOR.etcd_tls = settings.etcd_tls
    liveness = None
    if settings.health_address is not None:
        host, port = settings.health_address
        liveness = f"http://{host}:{port}/healthz"
    # kopf names itself after the login user unless told otherwise, and the Deployment runs us as a uid with no
    # passwd entry (getpass fails there): the pod's name is the identity (POD_ID, kopf's own convention).
    os.environ.setdefault("POD_ID", f"{socket.gethostname()}/{os.getpid()}")
    await kopf.operator(clusterwide=True, standalone=True, liveness_endpoint=liveness)
    return 0


async def _status(settings: StoreSettings, output: str, agent_metrics: str) -> int:
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls, call_timeout=3.0)
    try:
        status = await read_status(store, settings.schema)
    finally:
        await store.close()
    if agent_metrics:
        try:
            traffic = await asyncio.to_thread(read_agent_traffic, agent_metrics)
        except (OSError, ValueError) as exc:
            log.debug("no throughput columns: %s unreadable: %s", agent_metrics, exc)
        else:
            status = dataclasses.replace(status, traffic=traffic, traffic_from=agent_metrics)
    print(render_json(status) if output == "json" else render_table(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
