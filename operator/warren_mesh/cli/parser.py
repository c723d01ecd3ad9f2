"""The command line's flags: one sub-command per job, with the flags each job's settings read."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from warren_mesh import __version__
from warren_mesh.admin import graph as graph_module
from warren_mesh.identity import pki
from warren_mesh.settings import (
    AgentSettings,
    OperatorSettings,
    add_flag,
    add_store_flags,
)

log = logging.getLogger("warren_mesh")


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
    auth_restore = etcd_auth_commands.add_parser(
        "restore", help="give a node suspended over its hard quota its write permissions back (README: Quotas)"
    )
    auth_restore.add_argument("name")
    auth_restore.add_argument(
        "--clear",
        action="store_true",
        help="delete the node's keys first (its record and claims; its agent writes them again): else a node still "
        "over its hard quota is suspended again at once",
    )
    auth_guard = etcd_auth_commands.add_parser(
        "guard",
        help="suspend nodes past their hard quota until stopped (on Kubernetes the enroller does; README: Quotas)",
    )
    for sub in (auth_setup, auth_node, auth_restore, auth_guard):
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
    up.add_argument("--underlay", choices=("ipv4", "ipv6", "dual"), default="ipv4", help="every node's underlay")
    up.add_argument(
        "--underlay-of", default="", help="some nodes' own underlay, comma-separated: node-3=ipv4,node-4=ipv6"
    )
    up.add_argument(
        "--overlay", choices=("ipv4", "ipv6", "dual"), default="ipv4", help="the mesh's overlay and pod networks"
    )
    up.add_argument(
        "--locations",
        default="",
        help="locations on networks of their own, NAME:NODES[:WITH_WAN], e.g. a:3:2,b:2 (sets --nodes): see "
        "docs/topology.md",
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
