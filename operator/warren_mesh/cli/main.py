"""Parse the command line and run the command it names; a user's error is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence

from warren_mesh.admin import graph as graph_module
from warren_mesh.admin import peers, showconf
from warren_mesh.cli import admin, agent, lab, services
from warren_mesh.cli.parser import build_parser
from warren_mesh.enroller.client import EnrolmentError
from warren_mesh.host.underlay import UnderlayError
from warren_mesh.identity import pki
from warren_mesh.identity.keys import KeyFileError
from warren_mesh.lab.cni_runtime import CniError
from warren_mesh.lab.demo import run_demo
from warren_mesh.lab.layout import LabError
from warren_mesh.mesh.allocation import AddressSpaceExhausted, RegistrationConflict
from warren_mesh.settings import (
    AgentSettings,
    OperatorSettings,
    SettingsError,
    StoreSettings,
)
from warren_mesh.store.base import StoreError
from warren_mesh.testkit.etcd_server import EtcdServerError
from warren_mesh.trust.reasons import RecordError
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


def _demo(args: argparse.Namespace) -> int:
    if not 2 <= args.nodes <= 50:
        raise SettingsError(f"--nodes {args.nodes} is not between 2 and 50")
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    return 0 if asyncio.run(run_demo(args.nodes, sys.stdout)) else 1


# Command -> what runs it, given the parsed arguments.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "agent": lambda args: asyncio.run(agent.run_agent(AgentSettings.from_args(args))),
    "wireguard-go": agent.run_wireguard_go,
    "enroll": agent.run_enroll,
    "status": lambda args: asyncio.run(
        admin.run_status(StoreSettings.from_args(args), args.output, args.agent_metrics)
    ),
    "showconf": lambda args: asyncio.run(admin.run_showconf(StoreSettings.from_args(args), args)),
    "graph": lambda args: asyncio.run(admin.run_graph(StoreSettings.from_args(args), args)),
    "peer": lambda args: asyncio.run(admin.run_peer(StoreSettings.from_args(args), args)),
    "rotate-key": lambda args: asyncio.run(admin.run_rotate_key(StoreSettings.from_args(args), args.node)),
    "migrate-claims": lambda args: asyncio.run(admin.run_migrate_claims(StoreSettings.from_args(args))),
    "etcd-auth": lambda args: asyncio.run(admin.run_etcd_auth(StoreSettings.from_args(args), args)),
    "certs": admin.run_certs,
    "operator": lambda args: asyncio.run(services.run_operator(OperatorSettings.from_args(args))),
    "enroller": lambda args: asyncio.run(services.run_enroller(StoreSettings.from_args(args), args)),
    "lab": lab.run_lab,
    "demo": _demo,
}


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
        return COMMANDS[args.command](args)
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
