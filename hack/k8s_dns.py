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
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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
    dnsmasq = subprocess.Popen(
        [
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
        ],
        stdout=(home / "dnsmasq.log").open("ab"),
        stderr=subprocess.STDOUT,
    )

    def stop(*_: object) -> None:
        dnsmasq.terminate()
        dnsmasq.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    context = ssl.create_default_context(cafile=ca_file)
    token = Path(token_file).read_text().strip()
    written: list[tuple[str, str]] | None = None
    while dnsmasq.poll() is None:
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
            dnsmasq.send_signal(signal.SIGHUP)
            written = current
        time.sleep(1)
    print(f"k8s-dns: dnsmasq exited ({dnsmasq.returncode})", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
