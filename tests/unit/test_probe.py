"""Path probes (host/probe.py) on loopback: a probe is answered by the peer's responder and counted; nothing is
answered for a source outside the overlay networks, nor anything that is not a probe."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from helpers import run
from warren_mesh.host.probe import MAX_PROBE, REQUEST, PathProbe, probe_port

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")  # the "overlay" of this test
A, B = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_probe_is_answered_and_counted_and_strangers_get_nothing() -> None:
    async def body() -> None:
        port = _free_port()
        a, b = PathProbe(lambda: [LOOPBACK]), PathProbe(lambda: [LOOPBACK])
        await a.open((A,), port)
        await b.open((B,), port)
        try:
            a.send(B, port)
            for _ in range(50):
                await asyncio.sleep(0.02)
                if B in a.answered:
                    break
            assert B in a.answered and not b.answered, "b answered a; a answered nothing of b's"
            # Not from an overlay address: no answer. Too long, or no probe: no answer either.
            stranger = PathProbe(lambda: [ipaddress.ip_network("10.96.0.0/16")])
            await stranger.open((ipaddress.ip_address("127.0.0.4"),), port)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.bind(("127.0.0.5", 0))
                raw.settimeout(0.3)
                for payload in (REQUEST + b"x" * MAX_PROBE, b"hello"):
                    raw.sendto(payload, (str(B), port))
                    try:
                        raw.recvfrom(100)
                    except TimeoutError:
                        continue
                    raise AssertionError(f"answered {payload[:20]!r}")
            stranger.send(B, port)  # b answers (127.0.0.4 is in its overlay), the stranger does not count it
            await asyncio.sleep(0.2)
            assert not stranger.answered
            stranger.close()
        finally:
            a.close()
            b.close()

    run(body())


def test_the_probe_port_is_next_to_wireguards() -> None:
    assert probe_port(51820) == 51821 and probe_port(65535) == 65534
