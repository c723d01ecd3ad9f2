"""The commands that read or change the mesh in etcd: `status`, `showconf`, `graph`, `peer`, `rotate-key`,
`migrate-claims`, `etcd-auth`, and `certs` for the certificates they and the nodes use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import signal
import sys
import time
from pathlib import Path

from warren_mesh.admin import graph as graph_module
from warren_mesh.admin import peers, showconf
from warren_mesh.admin.migration import migrate_reservations
from warren_mesh.admin.reading import read_view
from warren_mesh.admin.status import read_agent_traffic, read_status, render_json, render_table
from warren_mesh.cli.stores import open_store
from warren_mesh.enroller.quota_guard import QuotaGuard
from warren_mesh.identity import pki
from warren_mesh.identity.keys import load as load_key
from warren_mesh.mesh.usage import DEFAULT_QUOTA
from warren_mesh.metrics.reading import read_agent_metrics
from warren_mesh.settings import (
    SettingsError,
    StoreSettings,
)
from warren_mesh.store import roles
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.trust.fields import validate_name

log = logging.getLogger("warren_mesh")


async def run_status(settings: StoreSettings, output: str, agent_metrics: str) -> int:
    async with open_store(settings, call_timeout=3.0) as store:
        status = await read_status(store, settings.schema)
    if agent_metrics:
        try:
            traffic = await asyncio.to_thread(read_agent_traffic, agent_metrics)
        except (OSError, ValueError) as exc:
            log.debug("no throughput columns: %s unreadable: %s", agent_metrics, exc)
        else:
            status = dataclasses.replace(status, traffic=traffic, traffic_from=agent_metrics)
    print(render_json(status) if output == "json" else render_table(status))
    return 0


async def run_showconf(settings: StoreSettings, args: argparse.Namespace) -> int:
    key = None
    if args.showconf_command == "peer" and args.private_key_file:
        key = load_key(Path(args.private_key_file))
    async with open_store(settings, call_timeout=3.0) as store:
        view = await read_view(store, settings.schema)
    if args.showconf_command == "peer":
        member = showconf.for_peer(view, args.name, private_key=key, dns=args.dns)
    else:
        member = showconf.for_node(view, args.name)
    print(member.render_json() if args.output == "json" else member.render(), end="\n" if args.output == "json" else "")
    return 0


async def run_graph(settings: StoreSettings, args: argparse.Namespace) -> int:
    urls = args.agent_metrics or ["http://127.0.0.1:9587/metrics"]
    async with open_store(settings, call_timeout=3.0) as store:
        view = await read_view(store, settings.schema)
    readings = []
    for url in urls:
        try:
            readings.append(await asyncio.to_thread(read_agent_metrics, url))
        except (OSError, ValueError) as exc:
            # The default (a local agent) is often not there; one the user named is worth a word.
            log.log(logging.WARNING if args.agent_metrics else logging.DEBUG, "no edges from %s: %s", url, exc)
    dot = graph_module.render_dot(view, readings, now=time.time(), stale_after=args.stale_after)
    await asyncio.to_thread(write_picture, graph_module.draw(dot, args.format), args.output)
    return 0


def write_picture(picture: bytes, output: str | None) -> None:
    """`graph`'s output: into ``output``, or (None) to standard output, as bytes (a PNG is not text)."""
    if output:
        Path(output).write_bytes(picture)
    else:
        sys.stdout.buffer.write(picture)


async def run_peer(settings: StoreSettings, args: argparse.Namespace) -> int:
    async with open_store(settings) as store:
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
        key, addresses = await peers.add(
            store, settings.schema, args.name, allowed_ips=allowed, persistent_keepalive=args.keepalive
        )
        view = await read_view(store, settings.schema)
    at = ", ".join(map(str, addresses))
    print(f"added peer {args.name} at {at}; its private key is only in the file below", file=sys.stderr)
    print(showconf.for_peer(view, args.name, private_key=key, dns=args.dns).render(), end="")
    return 0


async def run_rotate_key(settings: StoreSettings, node: str) -> int:
    validate_name(node)
    async with open_store(settings) as store:
        schema = settings.schema
        if await store.get(schema.node(node)) is None:
            raise SettingsError(f"no node {node!r} is registered in the mesh")
        await store.put(schema.key_rotation(node), json.dumps({"requested_at": time.time()}).encode())
    print(f"asked {node} for a new key; `warren-mesh status` shows it once published", file=sys.stderr)
    return 0


async def run_migrate_claims(settings: StoreSettings) -> int:
    async with open_store(settings) as store:
        report = await migrate_reservations(store, settings.schema)
    for line in report.lines() or ["nothing to migrate"]:
        print(line)
    return 1 if report.changed else 0


async def run_etcd_auth(settings: StoreSettings, args: argparse.Namespace) -> int:
    if args.etcd_auth_command == "guard":
        return await _guard_quotas(settings)
    nodes = [validate_name(name) for name in (args.node if args.etcd_auth_command == "setup" else [args.name])]
    async with open_store(settings) as store:
        auth = EtcdAuth(store)
        if args.etcd_auth_command == "setup":
            await roles.set_up(auth, settings.schema, nodes)
            print(f"etcd auth is on: root, {pki.OPERATOR_USER} and {len(nodes)} node(s) under {settings.schema.root}")
        elif args.etcd_auth_command == "restore":
            schema, node = settings.schema, nodes[0]
            if args.clear:
                cleared = await store.delete_prefix(schema.claims_of(node)) + await store.delete(schema.node(node))
                print(f"deleted {cleared} key(s) of {node}")
            if not await roles.restore_node(auth, schema, node):
                print(f"{node} was not suspended; {pki.node_user(node)} may write its record and its claims")
            else:
                print(f"{node} restored: {pki.node_user(node)} may write its record and its claims again")
        else:
            why = await roles.suspension(store, settings.schema, nodes[0])
            if why is not None:
                print(f"{nodes[0]} is suspended ({why}): see `warren-mesh etcd-auth restore`", file=sys.stderr)
                return 1
            await roles.add_node(auth, settings.schema, nodes[0])
            print(f"{pki.node_user(nodes[0])} may write {settings.schema.node(nodes[0])} and its claims")
    return 0


async def _guard_quotas(settings: StoreSettings) -> int:
    """Enforce the hard quota until SIGTERM or SIGINT (README, Quotas): what the enroller does on Kubernetes."""
    quota = DEFAULT_QUOTA
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_store(settings) as store:
        guard = loop.create_task(QuotaGuard(store, settings.schema, quota).run(), name="quota-guard")
        print(
            f"suspending nodes past {quota.hard_keys} keys or {quota.hard_bytes} bytes under their own keys in "
            f"{settings.schema.root}",
            flush=True,
        )
        stopping = loop.create_task(stop.wait())
        await asyncio.wait((guard, stopping), return_when=asyncio.FIRST_COMPLETED)
        for task in (guard, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return 0


def run_certs(args: argparse.Namespace) -> int:
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
