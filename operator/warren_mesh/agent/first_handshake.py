"""First handshakes that crossed: a pair of nodes that add each other at once starts over from one end.

Both ends of a new pair often add each other at the same moment: they react to the same watch event (a gateway
replaced, both gateways; a relay chosen; a location split). Each device then sends a handshake initiation at once
(the persistent keepalive, or the traffic waiting), and where each takes the other's initiation before the answer to
its own, both answers are dropped: a WireGuard peer accepts only the answer to the initiation it handled last, and
it answered the other's since. Neither has a session, and neither may initiate again before REKEY_TIMEOUT (5 s);
where the underlay's one-way delay is longer than the retries' jitter (a third of a second) the retries cross
again. Measured with two wireguard-go devices adding each other at once across a relay that delays every datagram:
a session after 5.3 s with no delay, 10.4 s with 50 ms and none within 12 s with 200 ms each way (the last is
tests/dataplane/test_first_handshake.py); a gateway failover in CI took 12.4 s instead of ~3.

Only a new peer escapes the wait. So ``CHECK_AFTER`` after adding a peer, the end with the greater public key (one
end only: both starting over at once would cross again) looks at it, and if it heard from the peer (so the other
end has it) but has no session, removes the peer and adds it again as it was: the new peer initiates at once, and
the other end, which is not initiating now, answers it. Once per peer added; WireGuard's own retries do the rest.
A peer that never answered (down, or not yet adding us) is left alone: the other end initiates when it adds us.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.values.device import DeviceState, PeerSpec
from warren_mesh.wireguard.backend import Backend, BackendError

log = logging.getLogger(__name__)

# Seconds after adding a peer before its first handshake is judged: several round trips of any underlay (a session
# needs one), and well before WireGuard's own retry at 5 s.
CHECK_AFTER = 1.0


def starts_over(own_key: str, peer_key: str) -> bool:
    """Whether this end, not the peer's, starts a crossed first handshake over (the same answer on both ends)."""
    return own_key > peer_key


def crossed(device: DeviceState, keys: Iterable[str]) -> list[PeerSpec]:
    """Of the peers ``keys``, those on ``device`` that heard from the other end but have no session."""
    found = []
    for key in keys:
        spec, stats = device.peers.get(key), device.stats.get(key)
        if spec is None or spec.endpoint is None or stats is None:
            continue  # gone since, or one that dials us (we cannot initiate)
        if stats.last_handshake == 0.0 and stats.receive_bytes > 0:
            found.append(spec)
    return found


class FirstHandshakes:
    def __init__(
        self, backend: Backend, device_thread: DeviceThread, *, own_key: Callable[[], str], metrics: AgentMetrics
    ) -> None:
        self._backend = backend
        self._device_thread = device_thread
        self._own_key = own_key
        self._metrics = metrics
        self._due: dict[str, float] = {}  # peer added (public key) -> when to judge its first handshake (monotonic)
        self._wake = asyncio.Event()

    def added(self, keys: Iterable[str], *, now: float | None = None) -> None:
        """Peers the device just gained (on the event loop, after the pass that added them)."""
        due = (time.monotonic() if now is None else now) + CHECK_AFTER
        own = self._own_key()
        for key in keys:
            if starts_over(own, key):
                self._due.setdefault(key, due)
        if self._due:
            self._wake.set()

    async def run(self) -> None:
        """Forever: judge each peer added once it is due."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._due:
                wait = min(self._due.values()) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    await self.judge(time.monotonic())

    async def judge(self, now: float) -> None:
        """Start over the peers due by ``now`` whose first handshakes crossed; the others are judged no more."""
        keys = [key for key, due in self._due.items() if due <= now]
        for key in keys:
            del self._due[key]
        if not keys:
            return
        try:
            await self._device_thread.run(lambda: self._start_over(keys))
        except BackendError as exc:  # the watchdog reports a dead device; WireGuard's own retries remain
            log.warning("could not look at the first handshakes of %d peers: %s", len(keys), exc)

    def _start_over(self, keys: list[str]) -> None:
        """On the device thread: the device is read and changed in one go, so no pass changes a peer in between
        (it is added again exactly as the device had it)."""
        for spec in crossed(self._backend.read(), keys):
            self._backend.remove_peer(spec)
            self._backend.set_peer(spec)
            self._metrics.handshakes_started_over.inc()
            log.info(
                "peer %s: our first handshakes crossed (each end answered the other's, and drops the answer to its "
                "own); added it again so that it initiates now, not in 5 s",
                spec.public_key,
            )
