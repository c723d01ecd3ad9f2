"""The node as a router for its pods: IP forwarding on, loose reverse-path filtering on the WireGuard device, and
one nftables table of ours that masquerades pod traffic leaving the cluster and clamps the MSS of TCP connections
through the tunnel to its MTU.

Traffic between pods (the pod network) and to the mesh (the overlay network) keeps its source address: only
traffic from this node's pod subnets to anywhere else is masqueraded, per IP
family. The table is replaced whole and atomically
(one ``nft -f`` transaction) whenever what is there differs from what should be, which a resync checks through the
rules' comments: each carries a digest of the whole desired table, so a deleted, changed or stale rule is seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from warren_mesh.values.netaddr import IPNetwork

log = logging.getLogger(__name__)

TABLE: Final = "warren-mesh"
PROC_SYS: Final = Path("/proc/sys/net")


class ForwardingError(RuntimeError):
    """The node could not be made to forward for its pods; the message says what failed."""


@dataclass(frozen=True, slots=True)
class PodRouting:
    """What this node's pods need of it."""

    subnets: tuple[IPNetwork, ...]  # this node's pod subnets, one per family
    pod_cidrs: tuple[IPNetwork, ...]
    overlay_cidrs: tuple[IPNetwork, ...]
    interface: str  # the WireGuard device
    masquerade: tuple[int, ...] = (4, 6)  # the IP versions whose traffic leaving the cluster is masqueraded

    @property
    def rules(self) -> int:
        """How many rules the table holds: the MSS clamp, and a masquerade per family that has one."""
        return 1 + len(self._masquerades())

    def _masquerades(self) -> tuple[str, ...]:
        """Per family (IPv6 too, as Calico and flannel do: a pod's address is in no route of the world's)."""
        rules = []
        for subnet in self.subnets:
            if subnet.version not in self.masquerade:
                continue
            family = "ip" if subnet.version == 4 else "ip6"
            inside = ", ".join(str(n) for n in (*self.pod_cidrs, *self.overlay_cidrs) if n.version == subnet.version)
            rules.append(f"{family} saddr {subnet} {family} daddr != {{ {inside} }} masquerade")
        return tuple(rules)

    def _clamp(self) -> str:
        # A pod made while the device's MTU was larger (the underlay's MTU or the mesh's changed since) still has
        # that MTU: its connections through the tunnel would rely on ICMP "fragmentation needed" reaching it, which
        # firewalls drop. Clamping the MSS of connections that leave through the tunnel to the route's MTU keeps
        # them working without it, in both directions (the SYN and the SYN-ACK each leave through some tunnel).
        return f'oifname "{self.interface}" tcp flags syn / syn,rst tcp option maxseg size set rt mtu'

    def digest(self) -> str:
        """Names this exact table: carried in its rules' comments, so a resync sees whether it is still there."""
        return hashlib.sha256("\n".join((*self._masquerades(), self._clamp())).encode()).hexdigest()[:16]

    def ruleset(self) -> str:
        """The whole table, as ``nft -f`` takes it (deleting the old one in the same transaction)."""
        comment = f'comment "{TABLE} {self.digest()}"'
        masquerades = "".join(f"    {rule} {comment}\n" for rule in self._masquerades())
        return (
            f"table inet {TABLE}\n"
            f"delete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            f"  chain forward {{\n"
            f"    type filter hook forward priority mangle; policy accept;\n"
            f"    {self._clamp()} {comment}\n"
            f"  }}\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"{masquerades}"
            f"  }}\n"
            f"}}\n"
        )


def ensure(routing: PodRouting, *, nft: str = "nft") -> list[str]:
    """Make the node forward for its pods; what had to change (empty when everything was in place)."""
    changed = []
    for version in sorted({subnet.version for subnet in routing.subnets}):
        forward = PROC_SYS / ("ipv4/ip_forward" if version == 4 else "ipv6/conf/all/forwarding")
        try:
            if _set(forward, "1"):
                changed.append(f"{forward.relative_to(PROC_SYS)}=1")
        except OSError as exc:
            # In a container /proc/sys is read-only: deploy/ sets this in a privileged init container instead.
            raise ForwardingError(f"cannot turn on IP forwarding ({forward}): {exc.strerror}") from None
    # Loose reverse-path filtering on the tunnel: a reply from a remote pod arrives through it, and strict mode
    # judges it too narrowly once policy routing (--fwmark) is involved; loose still drops sources this node cannot
    # reach at all. Not essential (the default route covers most), so a read-only /proc only costs a warning.
    rp_filter = PROC_SYS / f"ipv4/conf/{routing.interface}/rp_filter"
    try:
        if _set(rp_filter, "2"):
            changed.append(f"{rp_filter.relative_to(PROC_SYS)}=2")
    except OSError as exc:
        log.warning("cannot set %s to loose (2): %s", rp_filter, exc.strerror)
    if _table_digests(nft) != [routing.digest()] * routing.rules:
        _run([nft, "-f", "-"], routing.ruleset())
        changed.append(f"nftables table inet {TABLE}")
    return changed


def _set(path: Path, value: str) -> bool:
    """Write ``value`` to a sysctl file unless it holds it; whether it was written."""
    if path.read_text().strip() == value:
        return False
    path.write_text(value)
    return True


def remove(*, nft: str = "nft") -> None:
    """Delete our table (IP forwarding is left as it is: other software may rely on it)."""
    if _table_digests(nft) is not None:
        _run([nft, "delete", "table", "inet", TABLE], None)


def _table_digests(nft: str) -> list[str] | None:
    """The digests in our table's rule comments, in order; None when there is no table."""
    try:
        done = subprocess.run([nft, "-j", "list", "table", "inet", TABLE], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ForwardingError(f"{nft} is not installed (Debian: apt-get install nftables)") from None
    if done.returncode != 0:
        if "No such file or directory" in done.stderr or "does not exist" in done.stderr:
            return None
        raise ForwardingError(f"nft list table inet {TABLE} failed: {done.stderr.strip()}")
    digests = []
    for item in json.loads(done.stdout).get("nftables", []):
        comment = item.get("rule", {}).get("comment", "") if isinstance(item, dict) else ""
        if comment.startswith(f"{TABLE} "):
            digests.append(comment.split(" ", 1)[1])
        elif "rule" in item:
            digests.append("")  # a rule of someone else's in our table: replace the table
    return digests


def _run(argv: list[str], stdin: str | None) -> None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ForwardingError(f"{argv[0]} is not installed (Debian: apt-get install nftables)") from None
    if done.returncode != 0:
        raise ForwardingError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()}")
