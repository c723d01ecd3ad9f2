"""What crosses an underlay link, captured by a small sniffer process (the lab's tests and the real cluster's)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

# Captures IPv4 and IPv6 frames (not IPv6's link-local and multicast chatter) on one interface for a while (or
# until SIGINT) and prints them as JSON lists in Frame's order. ETH_P_ALL: a bridge port's frames reach only the
# taps that take every protocol. A large receive buffer, so that a busy machine's scheduler does not make the
# Python loop miss a burst.
SNIFFER = r"""
import json, signal, socket, struct, sys, time
iface, seconds = sys.argv[1], float(sys.argv[2])
stopped = []
signal.signal(signal.SIGINT, lambda *_: stopped.append(True))  # stop(): what was seen so far
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE (root may exceed rmem_max)
sock.bind((iface, 0))
sock.settimeout(0.2)
print("ready", flush=True)
seen, end = [], time.monotonic() + seconds
while time.monotonic() < end and not stopped:
    try:
        frame = sock.recv(65535)
    except TimeoutError:
        continue
    if frame[12:14] == b"\x86\xdd":  # IPv6: the next header, after a fragment header if there is one
        ip = frame[14:]
        proto, rest, fragment = ip[6], ip[40:], 0
        if proto == 44:
            proto, rest, fragment = rest[0], rest[8:], 1
            first = not int.from_bytes(ip[42:44], "big") & 0xFFF8
        else:
            first = True
        if ip[8] == 0xFE and ip[9] & 0xC0 == 0x80 or ip[24] == 0xFF:
            continue  # from a link-local address or to a multicast group (neighbour discovery, MLD): the link's own
        ports = struct.unpack("!HH", rest[:4]) if proto in (6, 17) and first else (0, 0)
        addresses = [socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])]
        seen.append([proto, *ports, fragment, *addresses, len(frame)])
        continue
    if frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    proto, ihl, offset = ip[9], (ip[0] & 0x0F) * 4, int.from_bytes(ip[6:8], "big")
    first = not offset & 0x1FFF  # only a first fragment (or a whole packet) starts with the ports
    ports = struct.unpack("!HH", ip[ihl:ihl + 4]) if proto in (6, 17) and first else (0, 0)
    addresses = [socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])]
    seen.append([proto, *ports, int(bool(offset & 0x3FFF)), *addresses, len(frame)])
print(json.dumps(seen))
"""


class Frame(NamedTuple):
    protocol: int  # IPv4's protocol, IPv6's (last) next header: ICMP is 1, ICMPv6 58
    sport: int  # 0 unless TCP or UDP (and for a fragment after the first)
    dport: int
    fragment: int  # 1 if it is a fragment: the more-fragments flag or an offset
    source: str
    destination: str
    length: int  # of the whole Ethernet frame


def sniff(interface: str, seconds: float, *, preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[str]:
    """Capture on ``interface`` for ``seconds`` from the moment this returns (``preexec_fn``: enter the namespace
    it is in). It returns once the sniffer's socket is bound: starting Python takes seconds in the emulated VM, and
    traffic sent meanwhile went uncaptured (a kernel test saw none of the pings it had just sent)."""
    sniffer = subprocess.Popen(
        [sys.executable, "-c", SNIFFER, interface, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,  # noqa: PLW1509 (a setns call at most)
    )
    assert sniffer.stdout is not None
    if sniffer.stdout.readline().strip() != "ready":
        sniffer.wait()
        raise RuntimeError(f"the sniffer on {interface} did not start (exit {sniffer.returncode})")
    return sniffer


def captured(sniffer: subprocess.Popen[str], *, stop: bool = False) -> list[Frame]:
    """The frames the sniffer saw: after its time is up, or at once with ``stop`` (the traffic of interest is over,
    however long it took on a busy machine)."""
    if stop:
        sniffer.send_signal(signal.SIGINT)
    out, _ = sniffer.communicate(timeout=30)
    return [Frame(*frame) for frame in json.loads(out)]
