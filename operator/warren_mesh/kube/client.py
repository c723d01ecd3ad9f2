"""The few Kubernetes API calls the operator makes itself (kopf makes the watching ones).

kopf reacts to events; the mesh mirror also has to write objects nobody changed (MeshNodes, Mesh status) from a
long-running loop, so it needs a client of its own. It logs in exactly as kopf does (kopf's own login functions:
in-cluster service account, else the kubeconfig), so both always act as the same identity.
"""

from __future__ import annotations

import builtins
import json
import ssl
import urllib.parse
from typing import Any

import aiohttp
import kopf

GROUP = "mesh.warren.io"
VERSION = "v1alpha1"


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {message}")
        self.status = status


def connection_info() -> kopf.ConnectionInfo:
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig (set KUBECONFIG)")
    return info


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
    )
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return context


class Kube:
    """Cluster-scoped custom objects of mesh.warren.io: list, get, create, merge-patch (object or status), delete."""

    def __init__(self, info: kopf.ConnectionInfo | None = None) -> None:
        self._info = info or connection_info()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, plural: str, name: str | None = None, subresource: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/{plural}"
        if name is not None:
            path += "/" + urllib.parse.quote(name)
        if subresource is not None:
            path += "/" + subresource
        return self._info.server.rstrip("/") + path

    async def _request(self, method: str, url: str, body: Any = None, content_type: str | None = None) -> Any:
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self._info.token:
                headers["Authorization"] = f"Bearer {self._info.token}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=_ssl_context(self._info)),
                timeout=aiohttp.ClientTimeout(total=15),
            )
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type or "application/json"} if body is not None else {}
        async with self._session.request(method, url, data=data, headers=headers) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                raise KubeError(response.status, message[:500])
            return json.loads(text) if text else None

    async def list(self, plural: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        url = self._url(plural)
        if label_selector:
            url += "?" + urllib.parse.urlencode({"labelSelector": label_selector})
        answer = await self._request("GET", url)
        items: list[dict[str, Any]] = answer.get("items", [])
        return items

    async def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = await self._request("POST", self._url(plural), body)
        return created

    async def patch(self, plural: str, name: str, patch: dict[str, Any], *, status: bool = False) -> dict[str, Any]:
        url = self._url(plural, name, "status" if status else None)
        patched: dict[str, Any] = await self._request("PATCH", url, patch, "application/merge-patch+json")
        return patched

    # --- core objects the enroller reads (warren_mesh/enroller) ---------------------------------------------------

    async def review_token(self, token: str, audiences: builtins.list[str]) -> dict[str, Any]:
        """The API server's TokenReview of ``token`` for ``audiences``: its ``status``."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        url = self._info.server.rstrip("/") + "/apis/authentication.k8s.io/v1/tokenreviews"
        review: dict[str, Any] = await self._request("POST", url, body)
        status: dict[str, Any] = review.get("status") or {}
        return status

    async def get_core(self, path: str) -> dict[str, Any] | None:
        """A core object (``namespaces/NS/pods/NAME``, ``nodes/NAME``), or None if there is none."""
        url = self._info.server.rstrip("/") + "/api/v1/" + "/".join(urllib.parse.quote(p) for p in path.split("/"))
        try:
            found: dict[str, Any] = await self._request("GET", url)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def delete(self, plural: str, name: str) -> None:
        try:
            await self._request("DELETE", self._url(plural, name))
        except KubeError as exc:
            if exc.status != 404:
                raise
