"""The enroller's HTTPS endpoint: ``POST /v1/node-certificate`` with a pod's token and a certificate request.

Request: ``Authorization: Bearer <projected service-account token>``, body the PEM request (at most 16 KiB),
optional ``?node=NAME`` (the node the agent believes it is on: refused if the API server says otherwise). Answer:
JSON ``{"node", "certificate", "ca"}``; 401 or 403 with a one-line reason; 400 for a bad request; 503 when the API
server or etcd cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from pathlib import Path

from aiohttp import web

from warren_mesh.enroller import MAX_REQUEST_BYTES, PATH
from warren_mesh.enroller.identity import AgentIdentity, KubeReader, Refused, node_of
from warren_mesh.enroller.quota_guard import QuotaGuard
from warren_mesh.identity import pki
from warren_mesh.kube.client import Kube, KubeError
from warren_mesh.store import roles
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.store.etcd_auth import EtcdAuth
from warren_mesh.values.keyspace import KeySchema

log = logging.getLogger(__name__)


class Enroller:
    def __init__(
        self, *, kube: KubeReader, identity: AgentIdentity, pki_dir: Path, etcd: EtcdStore, schema: KeySchema
    ) -> None:
        self._kube = kube
        self._identity = identity
        self._pki_dir = pki_dir
        self._etcd = etcd
        self._schema = schema

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post(PATH, self.handle)
        app.router.add_get("/healthz", _healthy)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return _refuse(401, "no bearer token: send the pod's projected service-account token")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _refuse(400, f"the request is larger than {MAX_REQUEST_BYTES} bytes")
        try:
            node, pod = await node_of(self._kube, header[7:].strip(), self._identity)
        except Refused as exc:
            log.warning("refused a node certificate (%d): %s", exc.status, exc)
            return _refuse(exc.status, str(exc))
        except (TimeoutError, KubeError, OSError) as exc:
            return _refuse(503, f"the API server could not be asked: {exc}")
        wanted = request.query.get("node")
        if wanted is not None and wanted != node:
            log.warning("refused pod %s a certificate for %s: it runs on %s", pod, wanted, node)
            return _refuse(403, f"pod {pod} runs on node {node}, not on {wanted[:64]!r}")
        try:
            certificate = pki.sign_request(self._pki_dir, body, pki.node_user(node))
        except pki.PkiError as exc:
            return _refuse(400, str(exc))
        try:
            suspended = await roles.suspension(self._etcd, self._schema, node)
            if suspended is None:
                await roles.add_node(EtcdAuth(self._etcd), self._schema, node)
        except StoreError as exc:
            return _refuse(503, f"etcd could not be given the node's user and role: {exc}")
        if suspended is not None:
            # Its certificate still lets it read (and keep its lease): its agent stays in the mesh, writing nothing.
            log.warning(
                "node %s is suspended (%s): its certificate is renewed, its write permissions are not", node, suspended
            )
        log.info("issued %s a certificate for pod %s", pki.node_user(node), pod)
        answer = {"node": node, "certificate": certificate.decode(), "ca": (self._pki_dir / "ca.pem").read_text()}
        return web.json_response(answer)


async def _healthy(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def _refuse(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": reason}), content_type="application/json")


async def serve(
    settings_pki: Path,
    *,
    host: str,
    port: int,
    identity: AgentIdentity,
    etcd: EtcdStore,
    schema: KeySchema,
    tls: tuple[Path, Path],
    stop: asyncio.Event,
) -> None:
    """Serve until ``stop`` is set. ``tls``: the enroller's own server certificate and key (of the mesh's CA, which
    agents already trust for etcd)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls[0]), str(tls[1]))
    async with Kube() as kube:
        enroller = Enroller(kube=kube, identity=identity, pki_dir=settings_pki, etcd=etcd, schema=schema)
        runner = web.AppRunner(enroller.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=context)
        await site.start()
        log.info("enroller listening on https://%s:%d%s", host, port, PATH)
        guarding = asyncio.get_running_loop().create_task(QuotaGuard(etcd, schema).run(), name="quota-guard")
        try:
            await stop.wait()
        finally:
            guarding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guarding
            await runner.cleanup()
