"""One agent, wired: identity -> register -> observe -> decide/apply -> report, until told to stop.

Start-up waits for etcd as long as it takes (the device, if it exists from a previous run, keeps carrying
traffic meanwhile). Once running, losing etcd changes nothing on the device: the watch and the keepalive retry
in the background and the mesh catches up when etcd is back. A graceful stop revokes the lease so peers drop
this node at once (or, with --restart-grace, leaves the record for the agent that replaces this one: a pod
restart), and leaves the device in place unless asked to remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry

from warren_mesh import keys, pki
from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.key_rotation import KeyRotation
from warren_mesh.agent.observer import MeshObserver
from warren_mesh.agent.pod_network import PodNetwork
from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.agent.registrar import Registrar
from warren_mesh.agent.underlay import (
    DEFAULT_MTU,
    addresses_of_hosts,
    default_route_address,
    mtu_of_address,
    subnets_of_address,
)
from warren_mesh.device import DeviceState
from warren_mesh.keys import NodeKey, load_or_create
from warren_mesh.mesh import endpoints
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.peers import MeshView, Rejection
from warren_mesh.metrics.http import MetricsServer
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.metrics.peer_collector import PeerCollector, TrafficWindow
from warren_mesh.model import MeshConfig, auto_mtu
from warren_mesh.netaddr import IPAddress, IPNetwork, parse_endpoints
from warren_mesh.settings import AgentSettings
from warren_mesh.store.base import Backoff, StoreError, StoreUnavailable
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.validation import RecordError, decode_json
from warren_mesh.wireguard.backend import Backend, BackendError
from warren_mesh.wireguard.choice import create_backend
from warren_mesh.wireguard.userspace import OFFLOAD_RELEASE, lacks_offloads

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_DEVICE_CHECK_INTERVAL = 1.0
# Seconds between looks at where peers' packets come from (a NAT mapping that changed is found this fast, once the
# node behind it has sent something: its persistent keepalive bounds that).
_ENDPOINT_CHECK_INTERVAL = 2.0  # when the throughput window samples nothing (else: as often as it samples)
_ROTATION_CHECK_INTERVAL = 5.0  # seconds between looks at whether the mesh's config asks for key rotation
_SCRAPE_DEVICE_TIMEOUT = 5.0  # a scrape waits this long for the device thread, then reports the device down


class Stopped(Exception):
    """The agent was told to stop while it was still starting."""


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        backend: Backend | None = None,
        device_factory: Callable[[], Backend] | None = None,
        registry: CollectorRegistry | None = None,
        key: NodeKey | None = None,
    ) -> None:
        """``backend``: a device made by the caller (the memory device of tests and the bench); ``device_factory``:
        how to make a real device, called by run() on the device thread that will own it (the default follows the
        settings; the bench passes one that drives wireguard-go in a namespace of its own)."""
        self.settings = settings
        self._backend: Backend | None = backend
        device = settings.device
        self._device_factory = device_factory or (
            lambda: create_backend(
                device.backend,
                device.interface,
                wireguard_go=device.wireguard_go,
                start_wireguard_go=device.start_wireguard_go,
            )
        )
        # Real devices are driven from one worker thread (see device_thread); the memory device inline.
        self.device_thread = DeviceThread(
            inline=backend.simulated if backend is not None else device.backend == "memory"
        )
        self.metrics = AgentMetrics(registry if registry is not None else CollectorRegistry())
        self.view = MeshView(settings.store.schema, on_reject=self._count_rejection)
        self.store = EtcdStore(
            settings.store.etcd_endpoints, tls=settings.store.tls, on_health=self.metrics.etcd_up.set
        )
        self.key = key if key is not None else self._load_key()
        self.key_rotation: KeyRotation | None = None
        self._version = ""  # the data plane's, as it says (wireguard-go's release)
        self._rotation_requested = asyncio.Event()
        self.reconciler: Reconciler | None = None
        self.registrar: Registrar | None = None
        self.pod_network: PodNetwork | None = None
        self.traffic = TrafficWindow()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("the agent has not created its backend yet (run() does)")
        return self._backend

    def _load_key(self) -> NodeKey:
        if keys.discard_pending(self.settings.device.key_file):
            log.warning("a key rotation had not installed its key when the agent stopped: it starts again later")
        key, created = load_or_create(self.settings.device.key_file)
        log.info(
            "%s key %s (public %s)",
            "created" if created else "loaded",
            self.settings.device.key_file,
            key.public_key,
        )
        return key

    def _count_rejection(self, rejection: Rejection) -> None:
        self.metrics.rejected_records.labels(rejection.reason).inc()

    def _rotation_request(self, value: bytes) -> None:
        """``{"requested_at": <Unix time>}`` under rotate/<this node> (written by `warren-mesh rotate-key`)."""
        try:
            doc = decode_json(value)
            requested_at = doc.get("requested_at") if isinstance(doc, dict) else None
            if type(requested_at) not in (int, float):
                raise RecordError("invalid_field", "requested_at is not a number")
        except RecordError as exc:
            log.warning("ignoring the key rotation request for %s: %s", self.settings.node_name, exc)
            return
        self.request_key_rotation(float(requested_at))  # type: ignore[arg-type]

    def _info(self) -> dict[str, str]:
        return {
            "node_name": self.settings.node_name,  # not "node": scrape configs set that label (deploy/monitoring)
            "backend": self.backend.name,
            "version": self._version,
            "interface": self.backend.interface_name,
            "public_key": self.key.public_key,
        }

    def request_key_rotation(self, requested_at: float | None = None) -> None:
        """Rotate the WireGuard key soon (SIGHUP, `warren-mesh rotate-key`): a request made at ``requested_at``
        counts only if the key in use is older (so a request acted on is not acted on again after a restart)."""
        rotation = self.key_rotation
        if requested_at is not None and rotation is not None:
            try:
                if requested_at <= rotation.key_created_at():
                    return
            except OSError:
                pass  # no key file to date the key by: the request stands
        self._rotation_requested.set()

    def healthy(self) -> bool:
        """Ready once the device has been configured from a complete view of the mesh."""
        return self.reconciler is not None and self.reconciler.passes > 0

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        if self._backend is None:
            self._backend = await self.device_thread.run(self._device_factory)
        self.metrics.registry.register(
            PeerCollector(
                read_device=lambda: self.device_thread.call(self.backend.read, timeout=_SCRAPE_DEVICE_TIMEOUT),
                peer_names=lambda: self.reconciler.peer_names() if self.reconciler is not None else {},
                window=self.traffic,
            )
        )
        server = None
        if settings.metrics.address:
            server = MetricsServer(settings.metrics.address, self.metrics.registry, self.healthy)
            server.start()
        version = await self.device_thread.run(lambda: self.backend.version)
        if version:
            log.info("data plane: %s %s", self.backend.name, version)
        if self.backend.name == "userspace" and lacks_offloads(version.removeprefix("wireguard-go ")):
            log.warning(
                "%s predates the TUN offloads of %s: expect about a third of the throughput (Debian: install "
                "wireguard-go from bookworm-backports, as hack/setup does)",
                version,
                OFFLOAD_RELEASE,
            )
        self._version = version
        self.metrics.info.info(self._info())
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start(stop, tasks)
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done:
                if task is not stopping:
                    task.result()  # a task only ends by failing: raise its error
        except Stopped:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.registrar is not None:
                grace = settings.registration.restart_grace
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        if grace:
                            await self.registrar.hand_over(grace)
                        else:
                            await self.registrar.deregister()
            await self.device_thread.run(lambda: self.backend.close(remove_device=settings.device.cleanup_on_exit))
            pods = self.pod_network
            if pods is not None and settings.device.cleanup_on_exit:
                await self.device_thread.run(pods.remove)
            self.device_thread.shutdown()
            await self.store.close()
            if server is not None:
                server.stop()

    async def _start(self, stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        settings = self.settings
        schema = settings.store.schema
        if settings.registration.endpoint_host is not None:
            endpoint_host = ipaddress.ip_address(settings.registration.endpoint_host)
        else:
            endpoint_host = await asyncio.to_thread(default_route_address)
            log.info("endpoint address %s (default route's interface)", endpoint_host)
        underlay_mtu = await self._underlay_mtu(endpoint_host)
        protected = await asyncio.to_thread(self._protected_networks, endpoint_host)
        log.info("never routed into the tunnel: %s", ", ".join(str(n) for n in protected))

        config = await self._until_etcd(stop, self._read_config)
        self.view.config = config
        registrar = Registrar(
            settings.registration,
            store=self.store,
            schema=schema,
            key=self.key,
            endpoint_host=endpoint_host,
            metrics=self.metrics,
        )
        registration = await self._until_etcd(stop, lambda: registrar.register(config))
        self.registrar = registrar
        subnets = registration.record.allowed_ips
        if subnets and settings.pods.route and not self.backend.simulated:  # a simulated device has no pods
            self.pod_network = PodNetwork(settings.pods, subnet=subnets[0], interface=self.backend.interface_name)
        self.reconciler = Reconciler(
            settings.device,
            view=self.view,
            backend=self.backend,
            local=LocalNode(
                settings.node_name,
                self.key.public_key,
                registration.record.overlay_ip,
                allowed_ips=registration.record.allowed_ips,
                protected=protected,
            ),
            key=self.key,
            metrics=self.metrics,
            auto_mtu=auto_mtu(underlay_mtu, endpoint_host.version),
            device_thread=self.device_thread,
            pod_network=self.pod_network,
        )
        loop = asyncio.get_running_loop()
        observer = MeshObserver(
            store=self.store,
            view=self.view,
            reconciler=self.reconciler,
            registrar=registrar,
            metrics=self.metrics,
            node_key=schema.node(settings.node_name),
            rotation_key=schema.key_rotation(settings.node_name),
            on_rotation_request=self._rotation_request,
        )
        tasks.append(loop.create_task(observer.run(), name="observe"))
        tasks.append(loop.create_task(self.reconciler.run(), name="reconcile"))
        tasks.append(loop.create_task(registrar.keep_alive(lambda: self.view.config), name="keepalive"))
        tasks.append(loop.create_task(self._watch_device(), name="device-watchdog"))
        self.key_rotation = KeyRotation(
            key_file=settings.device.key_file, registrar=registrar, reconciler=self.reconciler, metrics=self.metrics
        )
        tasks.append(loop.create_task(self._rotate_keys(self.key_rotation), name="key-rotation"))
        if not self.backend.simulated:
            tasks.append(loop.create_task(self._follow_underlay_mtu(endpoint_host, underlay_mtu), name="underlay-mtu"))
        if settings.store.tls is not None and settings.store.tls.cert_file is not None:
            tasks.append(loop.create_task(self._watch_certificate(settings.store.tls.cert_file), name="certificate"))
        # A simulated device has no endpoints of its own to see peers at.
        endpoints_of = None if self.backend.simulated else registrar
        if settings.metrics.traffic_sample_interval > 0 or endpoints_of is not None:
            pinned = settings.registration.endpoint_host is not None
            tasks.append(loop.create_task(self._watch_peers(endpoints_of, pinned=pinned), name="peers"))

    async def _watch_device(self) -> None:
        """Notice a dead data plane (wireguard-go crashed) within a second and configure the new one."""
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(_DEVICE_CHECK_INTERVAL)
            try:
                if await self.device_thread.run(self.backend.check):
                    self.reconciler.notify(verify=True)  # a new data plane: configure it from scratch
            except BackendError as exc:
                log.error("the WireGuard device is down and could not be restarted (retrying): %s", exc)

    async def _rotate_keys(self, rotation: KeyRotation) -> None:
        """Rotate the key when asked, and when it is older than the interval (--rotate-key-every, else the mesh's
        keyRotationIntervalHours)."""
        while True:
            interval = self.settings.device.rotate_key_every
            if interval is None and self.view.config.key_rotation_interval_hours:
                interval = self.view.config.key_rotation_interval_hours * 3600.0
            due = None
            if interval is not None:
                with contextlib.suppress(OSError):  # no key file (an identity given in code): never due
                    due = rotation.key_created_at() + interval - time.time()
            if due is not None and due <= 0:
                why = "interval"
            else:
                # Looked at again every few seconds: the mesh's interval may change, and the key come due.
                wait = _ROTATION_CHECK_INTERVAL if due is None else min(due, _ROTATION_CHECK_INTERVAL)
                try:
                    await asyncio.wait_for(self._rotation_requested.wait(), timeout=wait)
                except TimeoutError:
                    continue
                why = "asked"
            self._rotation_requested.clear()
            try:
                self.key = await rotation.rotate(why)
            except (StoreError, BackendError, OSError) as exc:
                log.error("key rotation failed (the old key stays in use; trying again in a minute): %s", exc)
                await asyncio.sleep(60.0)
                continue
            self.metrics.info.info(self._info())

    async def _publish_endpoints(self, registrar: Registrar, device: DeviceState, *, pinned: bool) -> None:
        """Publish where this node sees peers whose packets come from elsewhere than their records say, and, unless
        --endpoint pins ours, take as ours the endpoint peers see us at (behind NAT; docs/nat.md)."""
        assert self.reconciler is not None
        observed = endpoints.observed_elsewhere(device, self.reconciler.peer_names(), self.view, now=time.time())
        public = None if pinned else endpoints.public_endpoint(self.view, self.settings.node_name)
        try:
            await registrar.set_observed(observed)
            if public is not None:
                await registrar.set_public_endpoint(public)
        except StoreError as exc:
            log.warning("could not publish observed endpoints (retrying): %s", exc)

    async def _underlay_mtu(self, endpoint_host: IPAddress) -> int:
        if self.backend.simulated:  # its address is on no interface of this host
            return DEFAULT_MTU
        return await asyncio.to_thread(mtu_of_address, endpoint_host)

    async def _follow_underlay_mtu(self, endpoint_host: IPAddress, underlay_mtu: int) -> None:
        """Keep ``mtu: auto`` true when the underlay's MTU changes under a running agent (a cloud moving to jumbo
        frames, an operator lowering it for a VPN): a device MTU larger than the underlay allows has every
        full-size packet fragmented, or dropped where fragments are."""
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(self.settings.device.resync_interval)
            try:
                now = await self._underlay_mtu(endpoint_host)
            except OSError as exc:
                log.warning("cannot read the underlay's MTU (keeping %d): %s", underlay_mtu, exc)
                continue
            if now != underlay_mtu:
                follows = self.reconciler.set_auto_mtu(auto_mtu(now, endpoint_host.version))
                log.warning(
                    "the underlay's MTU changed from %d to %d%s",
                    underlay_mtu,
                    now,
                    "; the WireGuard device and new pods follow" if follows else " (the mesh sets its own MTU)",
                )
                underlay_mtu = now

    async def _watch_certificate(self, cert_file: Path) -> None:
        """Use a renewed etcd client certificate as soon as it is on disk (`warren-mesh enroll --watch` or `certs
        renew` replace it), and say when the one in use expires. An agent keeps its connection to etcd for months:
        without this it would notice an expired certificate only when it reconnects, and then fail to."""
        interval = self.settings.store.tls_reload_interval
        while True:
            self.store.reload_tls()
            with contextlib.suppress(OSError, ValueError):
                self.metrics.etcd_certificate_expiry.set(pki.not_after(cert_file).timestamp())
            await asyncio.sleep(interval)

    async def _watch_peers(self, registrar: Registrar | None, *, pinned: bool) -> None:
        """One reading of the device every few seconds serves both: the throughput window (the gauges average over
        it) and, given ``registrar``, the endpoints peers are seen at."""
        sample_traffic = self.settings.metrics.traffic_sample_interval > 0
        interval = self.settings.metrics.traffic_sample_interval if sample_traffic else _ENDPOINT_CHECK_INTERVAL
        while True:
            try:
                device = await self.device_thread.run(self.backend.read)
            except BackendError:
                pass  # the watchdog reports and repairs a dead device; the window just misses a sample
            else:
                if sample_traffic:
                    self.traffic.add(time.monotonic(), device.stats)
                if registrar is not None:
                    await self._publish_endpoints(registrar, device, pinned=pinned)
            await asyncio.sleep(interval)

    def _protected_networks(self, endpoint_host: IPAddress) -> tuple[IPNetwork, ...]:
        """What this node must reach outside the tunnel, whatever etcd says: its underlay address and subnet, and
        etcd's addresses (a route over them would cut the node off from its peers and from etcd)."""
        addresses = [endpoint_host]
        networks: list[IPNetwork] = []
        if not self.backend.simulated:  # a simulated node's address is on no interface of this host
            networks.extend(subnets_of_address(endpoint_host))
        addresses.extend(addresses_of_hosts(e.host for e in parse_endpoints(self.settings.store.etcd_endpoints)))
        networks.extend(ipaddress.ip_network(f"{a}/{a.max_prefixlen}") for a in addresses)
        return tuple(dict.fromkeys(networks))

    async def _read_config(self) -> MeshConfig:
        """The mesh config to register with. Read alone, not with the mesh: listing every record on every start
        would cost a cluster that boots at once a decode of the whole mesh per node. So a config that the view
        will refuse (one that would leave registered nodes out) is not recognised here; the operator never writes
        one, and docs/security.md says what a hostile one can do."""
        kv = await self.store.get(self.settings.store.schema.config)
        if kv is None:
            return MeshConfig()
        try:
            return MeshConfig.from_json(decode_json(kv.value))
        except RecordError as exc:
            log.warning("mesh config is invalid, using defaults until it is fixed: %s", exc)
            return MeshConfig()

    async def _until_etcd(self, stop: asyncio.Event, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Retry ``attempt`` while etcd is unreachable, until it succeeds or the agent is told to stop."""
        backoff = Backoff(maximum=2.0)
        warned = False
        while not stop.is_set():
            try:
                return await attempt()
            except StoreUnavailable as exc:
                if not warned:
                    log.warning("waiting for etcd: %s", exc)
                    warned = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.delay()):
                    await stop.wait()
        raise Stopped
