"""The test cluster's DNS: Debian's dnsmasq on the underlay, answering for the cluster's Services and Pods.

Real clusters run CoreDNS for this; Debian does not package it and no registry is reachable, so this add-on serves
the same names from the same source: every second it reads Services and Endpoints from the API server and writes
the records CoreDNS's kubernetes plugin would answer with (``SVC.NS.svc.cluster.local`` -> the ClusterIP, or for a
headless Service every endpoint, and ``HOSTNAME.SVC.NS.svc.cluster.local`` -> that endpoint, which is how a
StatefulSet's members find each other), then has dnsmasq read them again. It listens on the underlay, not on the
pod network, so hostNetwork pods resolve before any pod network exists.

    python hack/k8s_dns.py STATE_DIR LISTEN_ADDRESS API_SERVER CA_FILE TOKEN_FILE
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

CLUSTER_DOMAIN = "cluster.local"


def records(services: dict[str, Any], endpoints: dict[str, Any]) -> list[tuple[str, str]]:
    """(address, name) pairs for every Service and every named endpoint of a headless Service."""
    found: list[tuple[str, str]] = []
    by_name = {(item["metadata"]["namespace"], item["metadata"]["name"]): item for item in endpoints["items"]}
    for service in services["items"]:
        namespace, name = service["metadata"]["namespace"], service["metadata"]["name"]
        fqdn = f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"
        cluster_ip = service["spec"].get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            found.append((cluster_ip, fqdn))
            continue
        publish_not_ready = service["spec"].get("publishNotReadyAddresses", False)
        for subset in by_name.get((namespace, name), {}).get("subsets") or []:
            addresses = list(subset.get("addresses") or [])
            if publish_not_ready:
                addresses += subset.get("notReadyAddresses") or []
            for address in addresses:
                found.append((address["ip"], fqdn))
                if address.get("hostname"):
                    found.append((address["ip"], f"{address['hostname']}.{fqdn}"))
    return sorted(set(found))


def _get(server: str, path: str, context: ssl.SSLContext, token: str) -> Any:
    request = urllib.request.Request(f"{server}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=5) as response:
        return json.load(response)


def main() -> int:
    state, listen, server, ca_file, token_file = sys.argv[1:6]
    home = Path(state) / "dns"
    home.mkdir(parents=True, exist_ok=True)
    hosts = home / "hosts"
    hosts.write_text("")
    os.chmod(home, 0o755)
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts}",
        f"--listen-address={listen}",
        "--bind-interfaces",
        "--except-interface=lo",
        f"--local=/{CLUSTER_DOMAIN}/",
        "--local-ttl=1",
        "--user=root",
        "--pid-file=",
        "--log-facility=-",
    ]
    log = (home / "dnsmasq.log").open("ab")
    dnsmasq = _start(argv, log, listen)

    def stop(*_: object) -> None:
        dnsmasq.terminate()
        dnsmasq.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    context = ssl.create_default_context(cafile=ca_file)
    token = Path(token_file).read_text().strip()
    written: list[tuple[str, str]] | None = None
    while True:
        if dnsmasq.poll() is not None:  # a DNS server that died is started again, with the records written
            print(f"k8s-dns: dnsmasq exited ({dnsmasq.returncode}); starting it again", file=sys.stderr, flush=True)
            dnsmasq = _start(argv, log, listen)
        current: list[tuple[str, str]] | None
        try:
            current = records(
                _get(server, "/api/v1/services", context, token), _get(server, "/api/v1/endpoints", context, token)
            )
        except (OSError, ValueError, KeyError) as exc:
            print(f"k8s-dns: cannot read the API: {exc}", file=sys.stderr, flush=True)
            current = written
        if current is not None and current != written:
            scratch = hosts.with_suffix(".new")
            scratch.write_text("".join(f"{address} {name}\n" for address, name in current))
            scratch.replace(hosts)
            dnsmasq.send_signal(signal.SIGHUP)  # re-read the hosts file
            written = current
        time.sleep(1)


def _start(argv: list[str], log: IO[bytes], listen: str) -> subprocess.Popen[bytes]:
    """dnsmasq, once it answers: a SIGHUP before it has its handlers in place would end it."""
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    # A query for the root's NS record: any answer (even a refusal) means it is listening with its handlers set.
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.2)
            try:
                probe.sendto(query, (listen, 53))
                if probe.recv(512)[:2] == query[:2]:
                    return process
            except OSError:
                pass
    raise SystemExit(f"k8s-dns: dnsmasq did not answer on {listen}:53 (exit {process.poll()})")


if __name__ == "__main__":
    sys.exit(main())
