"""``warren-mesh enroll``: this node's etcd certificate from the enroller, its key made here and kept here."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from warren_mesh.enroller import PATH
from warren_mesh.identity import pki

log = logging.getLogger(__name__)

CERT, KEY, CA = "node.pem", "node-key.pem", "ca.pem"


class EnrolmentError(RuntimeError):
    """The enroller refused, or could not be reached; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Enrolment:
    node: str
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class EnrolmentRequest:
    """Where the enroller is and what to show it; where the credential goes; when to renew it."""

    url: str
    ca_file: Path  # the mesh CA, which signed the enroller's certificate
    token_file: Path  # the pod's projected service-account token
    directory: Path  # node.pem, node-key.pem (0600), ca.pem
    node_name: str | None = None  # the node this pod runs on, as the pod believes (refused if not so)
    renew_within_days: int = pki.RENEW_WITHIN_DAYS
    # Where to connect instead of resolving the URL's host (its Service's ClusterIP: there before cluster DNS is);
    # the certificate is still checked for the URL's host name. None: the URL's host.
    address: str | None = None


class _AddressedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the URL's host name at another address: curl's --connect-to."""

    def __init__(self, host: str, *, address: str, tls: ssl.SSLContext, timeout: float | None = None) -> None:
        super().__init__(host, timeout=timeout, context=tls)
        self._address, self._tls = address, tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


class _AddressedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, address: str, tls: ssl.SSLContext) -> None:
        super().__init__(context=tls)
        self._connection = functools.partial(_AddressedHTTPSConnection, address=address, tls=tls)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


def _open(request: urllib.request.Request, tls: ssl.SSLContext, address: str | None) -> http.client.HTTPResponse:
    if address is None:
        answer: http.client.HTTPResponse = urllib.request.urlopen(request, context=tls, timeout=30)  # noqa: S310
        return answer
    return urllib.request.build_opener(_AddressedHTTPSHandler(address, tls)).open(request, timeout=30)  # type: ignore[no-any-return]


def enroll(request: EnrolmentRequest) -> Enrolment | None:
    """Ask for a certificate unless the one in the directory is valid for more than ``renew_within_days`` (then
    None). The key is made once (0600) and only its public half is sent."""
    url, directory = request.url, request.directory
    cert, key_path, ca = directory / CERT, directory / KEY, directory / CA
    if (
        cert.exists()
        and key_path.exists()
        and pki.credential_problem(cert, key_path) is None
        and not pki.expires_within(cert, request.renew_within_days)
    ):
        return None
    key = pki.node_key(key_path)
    try:
        token = request.token_file.read_text().strip()
    except OSError as exc:
        raise EnrolmentError(f"cannot read the service-account token {request.token_file}: {exc.strerror}") from None
    if not url.startswith("https://"):
        raise EnrolmentError(f"--enroller {url} is not an https:// URL")
    if request.address is not None and request.address.startswith("$("):
        # The kubelet leaves a reference to a Service's variables as it is if the Service was made after the pod.
        raise EnrolmentError(f"--enroller-address {request.address} was not expanded: no such Service (yet)")
    target = url.rstrip("/") + PATH
    if request.node_name is not None:
        target += "?" + urllib.parse.urlencode({"node": request.node_name})
    http_request = urllib.request.Request(  # noqa: S310 (https only, checked above)
        target,
        data=pki.certificate_request(key),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/pkcs10"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=str(request.ca_file))
    try:
        with _open(http_request, context, request.address) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", "")
        except ValueError:
            reason = exc.reason
        raise EnrolmentError(f"the enroller refused ({exc.code}): {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise EnrolmentError(f"the enroller at {url} is not trusted: {reason.verify_message}") from None
        raise EnrolmentError(f"the enroller at {url} cannot be reached: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    _replace(ca, body["ca"])
    _replace(cert, body["certificate"])  # last: a running agent reloads when the certificate changes
    return Enrolment(str(body["node"]), cert, key_path, ca)


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (an agent may read it at any moment)."""
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    os.replace(partial, path)


def keep_enrolled(request: EnrolmentRequest, *, check_interval: float) -> NoReturn:
    """Forever: renew when due (the agent picks the new certificate up by itself), look again every
    ``check_interval`` seconds; failures are retried sooner, with backoff, and never end the loop."""
    retry = 5.0
    while True:
        try:
            done = enroll(request)
        except EnrolmentError as exc:
            delay = min(retry, check_interval)
            log.warning("%s (next try in %.0f s)", exc, delay)
            retry = min(retry * 2, 600.0)
        else:
            retry, delay = 5.0, check_interval
            if done is not None:
                log.info("renewed %s for %s", done.cert, pki.node_user(done.node))
        time.sleep(delay)
