"""Command line: ``warren-mesh agent | status | demo``.

Errors a user can cause (a bad flag, an unreadable key file, a name taken by another node, etcd away when a
one-shot command needs it) end in one line naming the fix and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from warren_mesh import __version__
from warren_mesh.agent.app import Agent
from warren_mesh.agent.registrar import AddressSpaceExhausted, RegistrationConflict
from warren_mesh.agent.underlay import UnderlayError
from warren_mesh.keys import KeyFileError
from warren_mesh.lab.demo import run_demo
from warren_mesh.lab.etcd_server import EtcdServerError
from warren_mesh.settings import AgentSettings, SettingsError, StoreSettings, add_flag, add_store_flags
from warren_mesh.status import read_status, render_json, render_table
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.wireguard.backend import BackendError

log = logging.getLogger("warren_mesh")

_USER_ERRORS = (
    SettingsError,
    KeyFileError,
    RegistrationConflict,
    AddressSpaceExhausted,
    UnderlayError,
    StoreError,
    EtcdServerError,
    BackendError,
    PermissionError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warren-mesh", description="WireGuard mesh control plane on etcd.")
    parser.add_argument("--version", action="version", version=f"warren-mesh {__version__}")
    add_flag(parser, "--log-level", "info", "debug, info, warning or error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="run the node agent")
    AgentSettings.add_arguments(agent)
    agent.add_argument("--cleanup-on-exit", action="store_true", help="remove the WireGuard device on exit")

    status = commands.add_parser("status", help="show the mesh as registered in etcd")
    add_store_flags(status)
    status.add_argument("--output", choices=("table", "json"), default="table")

    demo = commands.add_parser("demo", help="start a local etcd and N agents (memory backend); print the mesh")
    demo.add_argument("--nodes", type=int, default=3, help="number of agents (default 3)")
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
        if args.command == "status":
            return asyncio.run(_status(StoreSettings.from_args(args), args.output))
        if args.command == "demo":
            if not 2 <= args.nodes <= 50:
                raise SettingsError(f"--nodes {args.nodes} is not between 2 and 50")
            logging.getLogger().setLevel(max(level, logging.WARNING))
            return 0 if asyncio.run(run_demo(args.nodes, sys.stdout)) else 1
    except _USER_ERRORS as exc:
        print(f"warren-mesh: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SettingsError) else 1
    except KeyboardInterrupt:
        return 130
    return 2


async def _agent(settings: AgentSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(settings)
    await agent.run(stop)
    log.info("agent stopped")
    return 0


async def _status(settings: StoreSettings, output: str) -> int:
    store = EtcdStore(settings.etcd_endpoints, call_timeout=3.0)
    try:
        status = await read_status(store, settings.schema)
    finally:
        await store.close()
    print(render_json(status) if output == "json" else render_table(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
