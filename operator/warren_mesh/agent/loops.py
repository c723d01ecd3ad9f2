"""The agent's background loops besides the pipeline (observe -> decide/apply -> report) and the registrar's
lease: each a task of its own, named by what it looks after. None of them ends but by failing or being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.key_rotation import KeyRotation
from warren_mesh.agent.publication import RecordPublisher
from warren_mesh.agent.reachability import Reachability
from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.host.node import Host
from warren_mesh.identity import pki
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh import endpoints
from warren_mesh.mesh.view import MeshReader
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.metrics.peer_collector import TrafficWindow
from warren_mesh.store.base import Store, StoreError
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.records import auto_mtu
from warren_mesh.values.device import DeviceState
from warren_mesh.values.netaddr import IPAddress
from warren_mesh.wireguard.backend import Backend, BackendError

log = logging.getLogger(__name__)

DEVICE_CHECK_INTERVAL = 1.0
# Seconds between looks at where peers' packets come from (a NAT mapping that changed is found this fast, once the
# node behind it has sent something: its persistent keepalive bounds that).
ENDPOINT_CHECK_INTERVAL = 2.0  # when the throughput window samples nothing (else: as often as it samples)
ROTATION_CHECK_INTERVAL = 5.0  # seconds between looks at whether the mesh's config asks for key rotation


async def watch_device(device_thread: DeviceThread, backend: Backend, reconciler: Reconciler) -> None:
    """device-watchdog: notice a dead data plane (wireguard-go crashed) within a second and configure the new
    one."""
    while True:
        await asyncio.sleep(DEVICE_CHECK_INTERVAL)
        try:
            if await device_thread.run(backend.check):
                reconciler.notify(verify=True)  # a new data plane: configure it from scratch
        except BackendError as exc:
            log.error("the WireGuard device is down and could not be restarted (retrying): %s", exc)


async def rotate_keys(
    rotation: KeyRotation,
    *,
    requested: asyncio.Event,
    every: float | None,
    view: MeshReader,
    on_rotated: Callable[[NodeKey], None],
) -> None:
    """key-rotation: rotate the key when asked, and when it is older than ``every`` seconds (--rotate-key-every,
    else the mesh's keyRotationIntervalHours)."""
    while True:
        interval = every
        if interval is None and view.config.key_rotation_interval_hours:
            interval = view.config.key_rotation_interval_hours * 3600.0
        due = None
        if interval is not None:
            with contextlib.suppress(OSError):  # no key file (an identity given in code): never due
                due = rotation.key_created_at() + interval - time.time()
        if due is not None and due <= 0:
            why = "interval"
        else:
            # Looked at again every few seconds: the mesh's interval may change, and the key come due.
            wait = ROTATION_CHECK_INTERVAL if due is None else min(due, ROTATION_CHECK_INTERVAL)
            try:
                await asyncio.wait_for(requested.wait(), timeout=wait)
            except TimeoutError:
                continue
            why = "asked"
        requested.clear()
        try:
            key = await rotation.rotate(why)
        except (StoreError, BackendError, OSError) as exc:
            log.error("key rotation failed (the old key stays in use; trying again in a minute): %s", exc)
            await asyncio.sleep(60.0)
            continue
        on_rotated(key)


def underlay_auto_mtu(host: Host, endpoint_hosts: tuple[IPAddress, ...]) -> int:
    """The device's MTU for ``mtu: auto``: what the tightest of the underlays peers dial this node over allows (an
    IPv6 one takes 20 bytes more of overhead)."""
    return min(auto_mtu(host.underlay_mtu(address), address.version) for address in endpoint_hosts)


async def follow_underlay_mtu(
    host: Host, endpoint_hosts: tuple[IPAddress, ...], current: int, reconciler: Reconciler, *, interval: float
) -> None:
    """underlay-mtu: keep ``mtu: auto`` true when the underlay's MTU changes under a running agent (a cloud moving
    to jumbo frames, an operator lowering it for a VPN): a device MTU larger than the underlay allows has every
    full-size packet fragmented, or dropped where fragments are. ``current``: the auto MTU the device started
    with."""
    while True:
        await asyncio.sleep(interval)
        try:
            now = await asyncio.to_thread(underlay_auto_mtu, host, endpoint_hosts)
        except OSError as exc:
            log.warning("cannot read the underlay's MTU (keeping %d for the device): %s", current, exc)
            continue
        if now != current:
            follows = reconciler.set_auto_mtu(now)
            log.warning(
                "the underlay's MTU changed: the device's auto MTU is %d, was %d%s",
                now,
                current,
                "; the WireGuard device and new pods follow" if follows else " (the mesh sets its own MTU)",
            )
            current = now


async def reload_certificate(store: Store, cert_file: Path, metrics: AgentMetrics, *, interval: float) -> None:
    """certificate: use a renewed etcd client certificate as soon as it is on disk (`warren-mesh enroll --watch`
    or `certs renew` replace it), and say when the one in use expires. An agent keeps its connection to etcd for
    months: without this it would notice an expired certificate only when it reconnects, and then fail to."""
    while True:
        store.reload_tls()
        with contextlib.suppress(OSError, ValueError):
            metrics.etcd_certificate_expiry.set(pki.not_after(cert_file).timestamp())
        await asyncio.sleep(interval)


async def watch_peers(
    device_thread: DeviceThread,
    backend: Backend,
    *,
    traffic: TrafficWindow | None,
    interval: float,
    endpoints_to: EndpointWatch | None,
    reach_to: Reachability | None = None,
) -> None:
    """peers: one reading of the device every few seconds serves the throughput window (``traffic``: the gauges
    average over it) and, given ``endpoints_to``, the endpoints peers are seen at, and given ``reach_to``, the
    peers this node cannot reach directly."""
    while True:
        try:
            device = await device_thread.run(backend.read)
        except BackendError:
            pass  # the watchdog reports and repairs a dead device; the window just misses a sample
        else:
            if traffic is not None:
                traffic.add(time.monotonic(), device.stats)
            if endpoints_to is not None:
                await endpoints_to.publish(device)
            if reach_to is not None:
                try:
                    await reach_to.publish(device)
                except StoreError as exc:
                    log.warning("could not publish the peers this node cannot reach (retrying): %s", exc)
        await asyncio.sleep(interval)


class EndpointWatch:
    """Where the peers loop tells what it sees: this node's record, the names of the device's peers and the mesh;
    ``pinned``: --endpoint fixes this node's own endpoint."""

    def __init__(
        self,
        publication: RecordPublisher,
        peer_names: Callable[[], Mapping[str, str]],
        view: MeshReader,
        *,
        poke: Callable[[IPAddress], None],
        pinned: bool,
    ) -> None:
        """``poke``: sends a datagram to a peer's overlay address through the tunnel (Host.poke)."""
        self._publication = publication
        self._peer_names = peer_names
        self._view = view
        self._poke = poke
        self._poked: dict[str, float] = {}  # contested node -> when this loop last poked it
        self._pinned = pinned
        self._received: dict[str, tuple[int, float]] = {}  # public key -> (bytes received, when they last grew)
        self._contested_since: dict[str, float] = {}  # node name -> when this loop first saw it contested
        self._winner: Endpoint | None = None  # the endpoint peers see us at, by their votes, and since when
        self._winning_since = 0.0

    async def publish(self, device: DeviceState, *, now: float | None = None) -> None:
        """Publish where this node sees peers (docs/nat.md), and, unless pinned, take as ours the endpoint peers
        see us at once it has won their votes for ``endpoints.ADOPT_AFTER`` seconds (behind NAT)."""
        now = time.time() if now is None else now
        heard = self._heard(device, now)
        since = self._contested_since
        self._contested_since = {name: since.get(name, now) for name in endpoints.contested(self._view)}
        names = self._peer_names()
        seen = endpoints.observations(
            device, names, self._view, heard=heard, contested_since=self._contested_since, now=now
        )
        self._poke_unconfirmed(seen, now)
        try:
            await self._publication.set_observed(seen)
            adopt = self._adoptable(now)
            if adopt is not None:
                await self._publication.set_public_endpoint(adopt)
        except StoreError as exc:
            log.warning("could not publish observed endpoints (retrying): %s", exc)

    def _poke_unconfirmed(self, seen: tuple[tuple[str, Endpoint], ...], now: float) -> None:
        """Poke each contested node this node has not heard from since the contest began (every
        ``endpoints.POKE_EVERY`` s): its answer, a keepalive, is what a confirmation needs. An idle pair of peers may
        carry keepalives one way only (a received packet resets the sender's timer), so waiting is not enough."""
        spoken = {name for name, _ in seen}
        self._poked = {n: at for n, at in self._poked.items() if n in self._contested_since}
        for name in self._contested_since.keys() - spoken:
            entry = self._view.nodes.get(name)
            if (
                entry is None
                or name == self._publication.name
                or now - self._poked.get(name, 0.0) < endpoints.POKE_EVERY
            ):
                continue
            self._poked[name] = now
            self._poke(entry.record.overlay_ip)

    def _heard(self, device: DeviceState, now: float) -> dict[str, float]:
        """When each peer was last heard: its received bytes last grew, as far as this loop has watched them (a
        peer first seen now has no bytes to compare with), or its latest handshake, whichever is later. A handshake
        counts because it took a packet from the peer (its initiation, or its answer to ours): between idle peers
        keepalives may flow one way only, so a node behind NAT whose every keepalive the other side's resets is
        heard by that side at its handshakes alone, and would otherwise never be observed, nor found."""
        received = self._received
        for key, stats in device.stats.items():
            before = received.get(key)
            if before is None:
                received[key] = (stats.receive_bytes, 0.0)
            elif stats.receive_bytes != before[0]:
                received[key] = (stats.receive_bytes, now)
        for key in received.keys() - device.stats.keys():
            del received[key]
        latest = {key: max(grew, device.stats[key].last_handshake) for key, (_, grew) in received.items()}
        return {key: at for key, at in latest.items() if at}

    def _adoptable(self, now: float) -> Endpoint | None:
        if self._pinned:
            return None
        winner = endpoints.public_endpoint(self._view, self._publication.name)
        if winner != self._winner:
            self._winner, self._winning_since = winner, now
            return None
        return winner if winner is not None and now - self._winning_since >= endpoints.ADOPT_AFTER else None
