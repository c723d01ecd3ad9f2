"""A steady UDP probe between lab nodes, to see what a change costs the data plane (``python -m
warren_mesh.lab.probe`` inside a node's namespace; ``Probe`` runs one per node).

Each node sends ``rate`` datagrams a second to every other node's overlay address, each carrying its sequence
number, and receives theirs on the same socket. At the end it prints one JSON line: per source, how many arrived
and the longest gap between two arrivals; per target, how many were sent. Loss and gaps are then per directed pair.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

PORT = 7999
_HEADER = struct.Struct("!I")


# Probes on several nodes start a little apart: each listens this long before it sends and after it stops, so that
# none counts as lost what others sent before it listened or after it stopped.
_MARGIN = 1.0


def run(targets: list[str], rate: float, seconds: float, port: int = PORT) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    interval = 1.0 / rate
    sent = dict.fromkeys(targets, 0)
    arrivals: dict[str, list[float]] = {}
    start = time.monotonic()
    next_send = start + _MARGIN
    stop_sending = next_send + seconds
    end = stop_sending + _MARGIN
    seq = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        while next_send <= now and next_send < stop_sending:
            payload = _HEADER.pack(seq)
            for target in targets:
                sent[target] += 1  # a datagram the tunnel could not take counts as lost
                with contextlib.suppress(OSError):
                    sock.sendto(payload, (target, port))
            seq += 1
            next_send += interval
        while True:
            try:
                _, (source, _) = sock.recvfrom(64)
            except BlockingIOError:
                break
            arrivals.setdefault(source, []).append(time.monotonic())
        time.sleep(min(interval / 4, max(0.0, next_send - time.monotonic())))
    received = {
        source: {
            "count": len(times),
            "max_gap_ms": round(max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1000, 1),
        }
        for source, times in arrivals.items()
    }
    return {"sent": sent, "received": received, "seconds": seconds, "rate": rate}


@dataclass
class _Running:
    node: str
    address: str
    process: subprocess.Popen[str]


class Probe:
    """The probe on every node at once: ``start`` them, ``results`` waits for them all."""

    def __init__(self, nodes: dict[str, tuple[str, str]], *, rate: float, seconds: float) -> None:
        """``nodes``: name -> (network namespace, overlay address)."""
        self._nodes = nodes
        self._rate = rate
        self._seconds = seconds
        self._running: list[_Running] = []

    def start(self) -> None:
        for name, (netns, address) in self._nodes.items():
            targets = [a for n, (_, a) in self._nodes.items() if n != name]
            argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "warren_mesh.lab.probe"]
            argv += [str(self._rate), str(self._seconds), *targets]
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._running.append(_Running(name, address, process))

    def stop(self) -> None:
        for running in self._running:
            if running.process.poll() is None:
                running.process.kill()
            running.process.wait()

    def results(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(source, target) -> (loss as a fraction, longest gap in ms), for every directed pair."""
        reports = {}
        for running in self._running:
            out, err = running.process.communicate(timeout=self._seconds + 60)
            if running.process.returncode != 0:
                raise RuntimeError(f"the probe on {running.node} failed: {err.strip()[-500:]}")
            reports[running.node] = json.loads(out)
        pairs = {}
        for target, report in reports.items():
            for source, (_, address) in self._nodes.items():
                if source == target:
                    continue
                sent = reports[source]["sent"][self._nodes[target][1]]
                got = report["received"].get(address, {"count": 0, "max_gap_ms": self._seconds * 1000})
                loss = max(0.0, 1 - got["count"] / sent) if sent else 0.0
                pairs[(source, target)] = (round(loss, 4), float(got["max_gap_ms"]))
        return pairs


def main(argv: list[str], out: IO[str]) -> int:
    rate, seconds, targets = float(argv[0]), float(argv[1]), argv[2:]
    print(json.dumps(run(targets, rate, seconds)), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdout))
