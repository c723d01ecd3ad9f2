"""`warren-mesh agent`, `wireguard-go` and `enroll`: the commands a node runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

from warren_mesh.agent.app import Agent
from warren_mesh.agent.parts import node_parts
from warren_mesh.enroller.client import EnrolmentRequest, enroll, keep_enrolled
from warren_mesh.identity import pki
from warren_mesh.settings import (
    AgentSettings,
    SettingsError,
)
from warren_mesh.trust.fields import validate_name
from warren_mesh.wireguard import runner

log = logging.getLogger("warren_mesh")


async def run_agent(settings: AgentSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(settings, node_parts(settings))
    loop.add_signal_handler(signal.SIGHUP, agent.request_key_rotation)
    await agent.run(stop)
    log.info("agent stopped")
    return 0


def run_wireguard_go(args: argparse.Namespace) -> int:
    if args.backend not in ("auto", "userspace"):
        raise SettingsError(f"--backend {args.backend!r} is not auto or userspace")
    if not args.interface or len(args.interface) > 15 or "/" in args.interface:
        raise SettingsError(f"--interface {args.interface!r} is not a Linux interface name (1-15 characters)")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    runner.run(args.interface, args.backend, args.wireguard_go or None, stop)
    return 0


def run_enroll(args: argparse.Namespace) -> int:
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
