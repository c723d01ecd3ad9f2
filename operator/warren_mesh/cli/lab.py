"""`warren-mesh lab` and `demo`: a mesh to try on this machine."""

from __future__ import annotations

import argparse
import logging
import os
import time

from warren_mesh.cli.admin import write_picture
from warren_mesh.lab.lab import Lab
from warren_mesh.lab.layout import LabError, require_root
from warren_mesh.lab.locations import parse_locations
from warren_mesh.lab.report import pods_json, render_lab_table, render_pods_table, status_json
from warren_mesh.settings import (
    SettingsError,
)

log = logging.getLogger("warren_mesh")


def run_lab(args: argparse.Namespace) -> int:
    lab = Lab()
    require_root()
    if args.lab_command == "up":
        if args.locations:
            args.nodes = len(parse_locations(args.locations))
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
            underlay=args.underlay,
            underlay_of=dict(item.split("=", 1) for item in args.underlay_of.split(",") if "=" in item),
            overlay=args.overlay,
            locations=args.locations or None,
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
        write_picture(lab.graph(fmt=args.format), args.output)
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
