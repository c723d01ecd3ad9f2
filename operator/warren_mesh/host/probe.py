"""Path probes through the tunnel: does a peer answer over the overlay, right now?

A gateway must notice within seconds that it can no longer reach the other locations (its external link cut, its
node otherwise healthy: Kilo #489), and WireGuard does not say so: a handshake is renewed every two minutes, and
between idle peers keepalives may flow one way only. So every agent answers probes on its overlay addresses, at
its listen port + 1 (UDP), and a gateway probes the other locations' gateways every second; an answer is a round
trip through both devices and the path between them.

An answer is the request's bytes with one byte changed, never larger, and only to a source inside the mesh's
overlay networks (which arrives through the tunnel, authenticated by WireGuard): the responder amplifies nothing
and reflects nothing to the underlay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Final, cast

from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip

log = logging.getLogger(__name__)

REQUEST: Final = b"warren-mesh probe?"
ANSWER: Final = b"warren-mesh probe!"
MAX_PROBE: Final = 64  # bytes: a request with its nonce; anything longer is not ours
# Linux: bind an address before the device holds it (the agent opens the probe before it configures the device).
_IP_FREEBIND: Final = 15
_IPV6_FREEBIND: Final = 78


def probe_port(listen_port: int) -> int:
    """Where a node listening on ``listen_port`` answers probes (its WireGuard port + 1, or the one below it)."""
    return listen_port + 1 if listen_port < 65535 else listen_port - 1


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, probe: PathProbe) -> None:
        self._probe = probe
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's own class is no subclass of it

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.transport is not None:
            self._probe.received(data, addr, self.transport)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a probe: no answer, which is what the prober counts


class PathProbe:
    """Answers probes on this node's overlay addresses, sends them to peers', and remembers who answered when."""

    def __init__(self, overlays: Callable[[], Iterable[IPNetwork]]) -> None:
        """``overlays``: the mesh's overlay networks now (a mesh may gain a family); only their addresses are
        answered."""
        self._overlays = overlays
        self._transports: dict[IPAddress, asyncio.DatagramTransport] = {}  # overlay address -> its socket
        self._failed: set[IPAddress] = set()  # addresses that could not be bound (said once, tried again)
        self._port = 0
        self._nonce = os.urandom(8).hex().encode()
        self.answered: dict[IPAddress, float] = {}  # overlay address -> monotonic time of its last answer

    async def open(self, addresses: tuple[IPAddress, ...], port: int) -> None:
        """Answer on ``addresses`` (this node's overlay addresses) at ``port``: a socket for each address not yet
        bound (one the node gained: its mesh became dual-stack), none any more for one it gave up. Those it keeps
        stay as they are (closing a socket and binding its address again at once would find it still taken)."""
        if self._port != port:
            self.close()
            self._port = port
        for address in [a for a in self._transports if a not in addresses]:
            self._transports.pop(address).close()
        loop = asyncio.get_running_loop()
        for address in addresses:
            if address in self._transports:
                continue
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if address.version == 6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
                sock.bind((str(address), port))
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                if address not in self._failed:  # tried again with every call, said once
                    self._failed.add(address)
                    log.warning("cannot answer path probes on %s port %d (trying again): %s", address, port, exc)
                continue
            transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self), sock=sock)
            self._transports[address] = transport
            self._failed.discard(address)
        self._failed &= set(addresses)

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports = {}
        self._failed = set()

    def send(self, address: IPAddress, port: int) -> None:
        """Probe ``address`` (a peer's overlay address) at ``port``; its answer, if any, lands in ``answered``."""
        transport = next((t for a, t in self._transports.items() if a.version == address.version), None)
        if transport is not None:
            with contextlib.suppress(OSError):
                transport.sendto(REQUEST + self._nonce, (str(address), port))

    def received(self, data: bytes, addr: tuple[str | object, ...], transport: asyncio.DatagramTransport) -> None:
        if len(data) > MAX_PROBE or not isinstance(addr[0], str):
            return
        try:
            source = parse_ip(addr[0].split("%", 1)[0])
        except ValueError:
            return
        if not any(source.version == net.version and source in net for net in self._overlays()):
            return  # not through the tunnel: never answered, never counted
        if data.startswith(REQUEST):
            with contextlib.suppress(OSError):
                transport.sendto(ANSWER + data[len(REQUEST) :], addr)
        elif data == ANSWER + self._nonce:
            self.answered[source] = time.monotonic()
