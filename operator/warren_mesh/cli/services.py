"""`warren-mesh operator` and `enroller`: the cluster's services."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from warren_mesh.cli.stores import open_store
from warren_mesh.enroller.identity import AgentIdentity
from warren_mesh.settings import (
    OperatorSettings,
    SettingsError,
    StoreSettings,
)
from warren_mesh.values.netaddr import parse_listen_address

log = logging.getLogger("warren_mesh")


async def run_operator(settings: OperatorSettings) -> int:
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


async def run_enroller(settings: StoreSettings, args: argparse.Namespace) -> int:
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

    async with open_store(settings) as store:
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
    return 0
