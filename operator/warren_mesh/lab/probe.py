"""A steady UDP probe between lab nodes, to see what a change costs the data plane (``python -m
warren_mesh.lab.probe`` inside a node's namespace; ``Probe`` runs one per node).

Each node sends ``rate`` datagrams a second to every other node's overlay address, each carrying its sequence
number, and receives theirs on the same socket. At the end it prints one JSON line: per source, how many arrived
and the longest gap between two arrivals; per target, how many were sent. Loss and gaps are then per directed pair.
All start sending together: each binds its socket, says "ready", and waits for "go" on its stdin, which ``Probe``
sends once every node is ready (starting Python in a namespace takes seconds in the emulated VM, and a node that
sent before another listened counted its first datagrams as lost).
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

PORT = 7999
_HEADER = struct.Struct("!I")


# Each probe listens this long after it stops sending, so that none counts as lost what another sent last.
_MARGIN = 1.0


def run(
    targets: list[str], rate: float, seconds: float, port: int = PORT, *, ready: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """``ready``: called once the socket is bound; sending starts when it returns."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    ready()
    interval = 1.0 / rate
    sent = dict.fromkeys(targets, 0)
    arrivals: dict[str, list[float]] = {}
    next_send = time.monotonic()
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
        """Start the probe on every node and, once every one listens, let them all send."""
        for name, (netns, address) in self._nodes.items():
            targets = [a for n, (_, a) in self._nodes.items() if n != name]
            argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "warren_mesh.lab.probe"]
            argv += [str(self._rate), str(self._seconds), *targets]
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            self._running.append(_Running(name, address, process))
        for running in self._running:
            assert running.process.stdout is not None
            if running.process.stdout.readline().strip() != "ready":
                self.stop()
                error = running.process.stderr.read() if running.process.stderr is not None else ""
                raise RuntimeError(f"the probe on {running.node} did not start: {error.strip()[-500:]}")
        for running in self._running:
            assert running.process.stdin is not None
            running.process.stdin.write("go\n")
            running.process.stdin.flush()

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


def main(argv: list[str], out: IO[str], commands: IO[str]) -> int:
    rate, seconds, targets = float(argv[0]), float(argv[1]), argv[2:]

    def ready() -> None:
        print("ready", file=out, flush=True)
        commands.readline()  # "go": every node listens now

    print(json.dumps(run(targets, rate, seconds, ready=ready)), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdout, sys.stdin))
