"""The CNI network this node's pods join: a conflist for the standard plugins, written where runtimes look.

Debian's ``containernetworking-plugins`` do the whole job, so there is no plugin of ours: ``bridge`` puts each pod
on a bridge whose address is the gateway of the node's pod subnet, ``host-local`` hands out the subnet's addresses,
``portmap`` serves port mappings. The bridge's MTU is the WireGuard device's, so a pod never sends a packet the
tunnel would have to fragment. The bridge plugin's own masquerade (iptables) is off: the agent masquerades in its
own nftables table (host/forwarding.py), and pod-to-pod traffic keeps its source address.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

from warren_mesh.values.netaddr import IPNetwork

CONFLIST_NAME: Final = "10-warren-mesh.conflist"
NETWORK_NAME: Final = "warren-mesh"
BRIDGE: Final = "wm-pods0"
CNI_VERSION: Final = "1.0.0"  # what Debian 12's plugins (1.1.1) speak


def gateway(subnet: IPNetwork) -> str:
    """The pods' gateway on ``subnet``: its first address, the bridge's."""
    return str(subnet.network_address + 1)


def conflist(subnets: tuple[IPNetwork, ...], *, mtu: int, ipam_data_dir: str | None = None) -> dict[str, Any]:
    """The network config for pods on ``subnets`` (one per family: a dual-stack pod gets an address of each; the
    first address of each is the bridge's, their gateway)."""
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": str(subnet), "gateway": gateway(subnet)}] for subnet in subnets],
        "routes": [{"dst": "0.0.0.0/0" if subnet.version == 4 else "::/0"} for subnet in subnets],
    }
    if ipam_data_dir:
        ipam["dataDir"] = ipam_data_dir
    return {
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "mtu": mtu,
                "ipam": ipam,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write_conflist(directory: Path, config: dict[str, Any]) -> bool:
    """Write ``config`` as the node's conflist, whole (a runtime may read it at any moment) and only when it
    differs from what is there. Whether it was written."""
    text = json.dumps(config, indent=2) + "\n"
    path = directory / CONFLIST_NAME
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{CONFLIST_NAME}.new"
    partial.write_text(text)
    os.replace(partial, path)
    return True


def remove_conflist(directory: Path) -> None:
    (directory / CONFLIST_NAME).unlink(missing_ok=True)
