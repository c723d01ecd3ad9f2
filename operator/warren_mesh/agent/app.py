"""One agent, wired: identity -> register -> observe -> decide/apply -> report, until told to stop.

The parts it runs on (its store, its host, its device) are made by whoever starts it (``AgentParts``;
agent/parts.py for this machine): the wiring here decides nothing about them. Start-up waits for etcd as long as it
takes (the device, if it exists from a previous run, keeps carrying traffic meanwhile). Once running, losing etcd
changes nothing on the device: the watch and the keepalive retry in the background and the mesh catches up when
etcd is back. A graceful stop revokes the lease so peers drop this node at once (or, with --restart-grace, leaves
the record for the agent that replaces this one: a pod restart), and leaves the device in place unless asked to
remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warren_mesh.agent import loops
from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.device_writer import DeviceWriter
from warren_mesh.agent.first_handshake import FirstHandshakes
from warren_mesh.agent.gateway import GatewayRole
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.joining import Stopped, join
from warren_mesh.agent.key_rotation import KeyRotation, rotation_request
from warren_mesh.agent.observer import MeshObserver
from warren_mesh.agent.reachability import Reachability
from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.agent.registrar import Registrar
from warren_mesh.agent.report import Reporter
from warren_mesh.host.node import Host
from warren_mesh.host.pod_network import PodNetwork
from warren_mesh.host.probe import PathProbe
from warren_mesh.identity import keys
from warren_mesh.identity.keys import NodeKey, load_or_create
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.damping import Damper
from warren_mesh.mesh.decision import Decider
from warren_mesh.mesh.view import MeshView
from warren_mesh.metrics.http import MetricsServer
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.metrics.peer_collector import PeerCollector, TrafficWindow
from warren_mesh.settings import AgentSettings
from warren_mesh.store.base import Store
from warren_mesh.trust.reasons import RecordError
from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_endpoints
from warren_mesh.values.watch import Snapshot
from warren_mesh.wireguard.backend import Backend
from warren_mesh.wireguard.userspace import OFFLOAD_RELEASE, lacks_offloads

log = logging.getLogger(__name__)

_SCRAPE_DEVICE_TIMEOUT = 5.0  # a scrape waits this long for the device thread, then reports the device down


@dataclass(frozen=True, slots=True)
class AgentParts:
    """What an agent runs on. Its device is either made by ``make_device`` on the device thread that will own it
    (a real device: pyroute2's sockets belong to the thread that made them) or given as ``device`` and driven
    inline (the memory device of tests and benchmarks)."""

    store: Store
    host: Host
    metrics: AgentMetrics
    device: Backend | None = None
    make_device: Callable[[], Backend] | None = None


class Agent:
    def __init__(self, settings: AgentSettings, parts: AgentParts, *, key: NodeKey | None = None) -> None:
        if (parts.device is None) == (parts.make_device is None):
            raise ValueError("an agent needs exactly one of a device and a way to make one")
        self.settings = settings
        self._parts = parts
        self._backend: Backend | None = parts.device
        self.device_thread = DeviceThread(inline=parts.device is not None)
        self.store = parts.store
        self.host = parts.host
        self.metrics = parts.metrics
        # Changed only by the observe stage, which also releases what the damper held back.
        self.view = MeshView(settings.store.schema, damper=Damper())
        self.identity = Identity(key if key is not None else self._load_key())
        self.reporter = Reporter(self.metrics, local_name=settings.node_name)
        self.key_rotation: KeyRotation | None = None
        self._version = ""  # the data plane's, as it says (wireguard-go's release)
        self._rotation_requested = asyncio.Event()
        self.reconciler: Reconciler | None = None
        self.registrar: Registrar | None = None
        self.pod_network: PodNetwork | None = None
        self.path_probe: PathProbe | None = None  # answers (and sends) path probes on the overlay addresses
        self.traffic = TrafficWindow()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("the agent has not created its backend yet (run() does)")
        return self._backend

    @property
    def key(self) -> NodeKey:
        return self.identity.key

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

    def _info(self) -> dict[str, str]:
        return {
            "node_name": self.settings.node_name,  # not "node": scrape configs set that label (deploy/monitoring)
            "backend": self.backend.name,
            "version": self._version,
            "interface": self.backend.interface_name,
            "public_key": self.identity.public_key,
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
            assert self._parts.make_device is not None
            self._backend = await self.device_thread.run(self._parts.make_device)
        self.metrics.registry.register(
            PeerCollector(
                read_device=lambda: self.device_thread.call(self.backend.read, timeout=_SCRAPE_DEVICE_TIMEOUT),
                peer_names=lambda: self.reconciler.peer_names() if self.reconciler is not None else {},
                window=self.traffic,
            )
        )
        server = None
        if settings.metrics.address or settings.metrics.health_address:
            server = MetricsServer(
                settings.metrics.address,
                self.metrics.registry,
                self.healthy,
                health_address=settings.metrics.health_address,
            )
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
            if self.path_probe is not None:
                self.path_probe.close()
            self.device_thread.shutdown()
            await self.store.close()
            if server is not None:
                server.stop()

    async def _start(self, stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        settings, host = self.settings, self.host
        endpoint_hosts: tuple[IPAddress, ...]
        if settings.registration.endpoint_hosts:
            endpoint_hosts = tuple(ipaddress.ip_address(h) for h in settings.registration.endpoint_hosts)
        else:
            endpoint_hosts = await asyncio.to_thread(host.endpoint_addresses, settings.registration.endpoint_family)
            log.info("endpoint address %s (default route's interface)", ", ".join(map(str, endpoint_hosts)))
        device_mtu = await asyncio.to_thread(loops.underlay_auto_mtu, host, endpoint_hosts)
        protected = await asyncio.to_thread(self._protected_networks, endpoint_hosts)
        log.info("never routed into the tunnel: %s", ", ".join(str(n) for n in protected))

        registrar = Registrar(
            settings.registration,
            store=self.store,
            schema=settings.store.schema,
            identity=self.identity,
            endpoint_hosts=endpoint_hosts,
            metrics=self.metrics,
        )
        config, registration, observer = await join(
            stop, self.store, settings.store.schema, registrar, lambda listed: self._observer(registrar, listed)
        )
        self.registrar = registrar
        record = registration.record
        if record.allowed_ips:
            self.pod_network = host.pod_network(
                settings.pods, subnets=record.allowed_ips, interface=self.backend.interface_name
            )
        local = LocalNode(
            settings.node_name,
            self.identity.public_key,
            record.overlay_ips,
            allowed_ips=record.allowed_ips,
            protected=protected,
            underlay_families=tuple(e.host.version for e in record.endpoints),
        )
        first_handshakes = None
        if host.sees_peer_endpoints:  # a real device: its peers handshake
            first_handshakes = FirstHandshakes(
                self.backend, self.device_thread, own_key=lambda: self.identity.public_key, metrics=self.metrics
            )
        reconciler = self.reconciler = Reconciler(
            view=self.view,
            decider=Decider(local, auto_mtu=device_mtu, fwmark=settings.device.fwmark),
            identity=self.identity,
            backend=self.backend,
            writer=DeviceWriter(self.backend, self.identity),
            device_thread=self.device_thread,
            resync_interval=settings.device.resync_interval,
            report=self.reporter.pass_done,
            on_device_unreadable=self.reporter.device_unreadable,
            on_peers_added=first_handshakes.added if first_handshakes is not None else lambda _: None,
            pod_network=self.pod_network,
        )
        self.key_rotation = KeyRotation(
            key_file=settings.device.key_file,
            publication=registrar.publication,
            reconciler=reconciler,
            metrics=self.metrics,
        )

        def start(name: str, loop: Awaitable[None]) -> None:
            tasks.append(asyncio.ensure_future(loop))
            tasks[-1].set_name(name)

        start("observe", self._observe(observer, registrar, reconciler))
        start("reconcile", reconciler.run())
        start("keepalive", registrar.keep_alive(lambda: self.view.config if self.view.synced else config))
        start("device-watchdog", loops.watch_device(self.device_thread, self.backend, reconciler))
        if first_handshakes is not None:
            start("first-handshakes", first_handshakes.run())
        start(
            "key-rotation",
            loops.rotate_keys(
                self.key_rotation,
                requested=self._rotation_requested,
                every=settings.device.rotate_key_every,
                view=self.view,
                on_rotated=lambda _: self.metrics.info.info(self._info()),
            ),
        )
        start(
            "underlay-mtu",
            loops.follow_underlay_mtu(
                host, endpoint_hosts, device_mtu, reconciler, interval=settings.device.resync_interval
            ),
        )
        tls = settings.store.tls
        if tls is not None and tls.cert_file is not None:
            interval = settings.store.tls_reload_interval
            start("certificate", loops.reload_certificate(self.store, tls.cert_file, self.metrics, interval=interval))
        sample = settings.metrics.traffic_sample_interval
        endpoints_to = None
        if host.sees_peer_endpoints:
            pinned = bool(settings.registration.endpoint_hosts)
            endpoints_to = loops.EndpointWatch(
                registrar.publication, reconciler.peer_names, self.view, poke=host.poke, pinned=pinned
            )
        reach_to = None
        if host.sees_peer_endpoints:
            reach_to = Reachability(
                registrar.publication, self.view, peer_names=reconciler.peer_names, paths=lambda: reconciler.paths
            )
        if sample > 0 or endpoints_to is not None:
            start(
                "peers",
                loops.watch_peers(
                    self.device_thread,
                    self.backend,
                    traffic=self.traffic if sample > 0 else None,
                    interval=sample if sample > 0 else loops.ENDPOINT_CHECK_INTERVAL,
                    endpoints_to=endpoints_to,
                    reach_to=reach_to,
                ),
            )
        start("gateway", self._gateway_role(registrar, reconciler).run())

    def _gateway_role(self, registrar: Registrar, reconciler: Reconciler) -> GatewayRole:
        """Standing as this location's gateway, and giving up when the other locations cannot be reached; probes
        answered on the overlay addresses (where the device is real)."""
        settings = self.settings.registration
        probe = None
        if self.host.sees_peer_endpoints:
            probe = self.path_probe = PathProbe(lambda: self.view.config.overlay_cidrs)
        return GatewayRole(
            store=self.store,
            schema=self.settings.store.schema,
            name=settings.node_name,
            location=lambda: registrar.publication.location,
            can_stand=bool(settings.external_hosts),
            view=self.view,
            registration=lambda: registrar.current,
            paths=lambda: reconciler.paths,
            probe=probe,
            metrics=self.metrics,
        )

    def _observer(self, registrar: Registrar, listed: Snapshot) -> MeshObserver:
        return MeshObserver(
            store=self.store,
            view=self.view,
            watched=lambda: (*registrar.watched_keys, self._rotation_key),
            owner=self.settings.node_name,
            on_restart=self.reporter.watch_restarted,
            listed=listed,
        )

    @property
    def _rotation_key(self) -> str:
        return self.settings.store.schema.key_rotation(self.settings.node_name)

    async def _observe(self, observer: MeshObserver, registrar: Registrar, reconciler: Reconciler) -> None:
        """The pipeline's head: each batch the observer folds in goes to the report, wakes decide/apply, and tells
        the registrar (the one writer) and key rotation what it said about their keys."""
        rotation_key = self._rotation_key
        async for batch in observer.batches():
            self.reporter.observed(batch.changes, batch.events, batch.quota)
            if batch.changes.anything:
                reconciler.notify(batch.changes)
            request = batch.mentioned.get(rotation_key)
            if request is not None:
                try:
                    self.request_key_rotation(rotation_request(request))
                except RecordError as exc:
                    log.warning("ignoring the key rotation request for %s: %s", self.settings.node_name, exc)
            await registrar.follow(batch)
            self._take_holdings(registrar, reconciler)

    def _take_holdings(self, registrar: Registrar, reconciler: Reconciler) -> None:
        """After a config change our registration may hold addresses or pod subnets of a family the mesh gained:
        the device and the pods' network follow."""
        current = registrar.current
        local = reconciler.local
        if current is None or (current.record.overlay_ips, current.record.allowed_ips) == (
            local.overlay_ips,
            local.allowed_ips,
        ):
            return
        record = current.record
        if self.pod_network is not None:
            self.pod_network.subnets = record.allowed_ips
        elif record.allowed_ips:
            self.pod_network = self.host.pod_network(
                self.settings.pods, subnets=record.allowed_ips, interface=self.backend.interface_name
            )
        pods = ", ".join(str(n) for n in record.allowed_ips) or "none"
        log.info("the device and the pods follow: %s, pods %s", ", ".join(record.overlay_texts), pods)
        reconciler.set_holdings(record.overlay_ips, record.allowed_ips, self.pod_network)

    def _protected_networks(self, endpoint_hosts: tuple[IPAddress, ...]) -> tuple[IPNetwork, ...]:
        """What this node must reach outside the tunnel, whatever etcd says: its underlay addresses and subnets,
        and etcd's addresses (a route over them would cut the node off from its peers and from etcd)."""
        addresses = list(endpoint_hosts)
        networks: list[IPNetwork] = [n for h in endpoint_hosts for n in self.host.underlay_networks(h)]
        addresses.extend(self.host.resolve(e.host for e in parse_endpoints(self.settings.store.etcd_endpoints)))
        networks.extend(ipaddress.ip_network(f"{a}/{a.max_prefixlen}") for a in addresses)
        return tuple(dict.fromkeys(networks))
