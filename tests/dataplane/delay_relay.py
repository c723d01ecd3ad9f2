"""A slow underlay between two WireGuard devices: run inside a namespace, it forwards datagrams between two
ports, each one ``DELAY`` seconds late, the way a long path between two nodes would.

A device dials the other at HOST:PORT_A; what arrives there goes to TARGET_B from HOST:PORT_B, and what arrives at
HOST:PORT_B goes to TARGET_A from HOST:PORT_A, so each device sees the other at the address it dials. Prints
"ready" once both ports listen; exits when its stdin closes.

Usage: delay_relay.py DELAY HOST PORT_A TARGET_B:PORT PORT_B TARGET_A:PORT
"""

from __future__ import annotations

import socket
import sys
import threading


def _pump(source: socket.socket, sink: socket.socket, target: tuple[str, int], delay: float) -> None:
    while True:
        try:
            data = source.recv(65535)
        except OSError:
            return
        threading.Timer(delay, sink.sendto, (data, target)).start()


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str]) -> None:
    delay, host = float(argv[0]), argv[1]
    port_a, target_b, port_b, target_a = int(argv[2]), _target(argv[3]), int(argv[4]), _target(argv[5])
    side_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    side_a.bind((host, port_a))
    side_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    side_b.bind((host, port_b))
    for source, sink, target in ((side_a, side_b, target_b), (side_b, side_a, target_a)):
        threading.Thread(target=_pump, args=(source, sink, target, delay), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])
