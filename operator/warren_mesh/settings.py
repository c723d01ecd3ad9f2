"""Typed settings from flags, each of which can also come from ``WARREN_MESH_<FLAG>`` in the environment.

Every value is checked here, before anything starts, so a typo is one clear sentence naming the flag instead of
a traceback from deep inside the agent.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.identity.pki import credential_problem
from warren_mesh.trust.fields import split_host_port, validate_name, validate_port
from warren_mesh.trust.networks import endpoint_problem
from warren_mesh.trust.node_fields import validate_location
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import MIN_LEASE_TTL
from warren_mesh.values.keyspace import DEFAULT_PREFIX, KeySchema
from warren_mesh.values.netaddr import IPNetwork, parse_endpoints, parse_listen_address

BackendName = Literal["auto", "kernel", "userspace", "memory"]
BACKENDS: Final = ("auto", "kernel", "userspace", "memory")
DEFAULT_ETCD: Final = "http://127.0.0.1:2379"
DEFAULT_KEY_FILE: Final = "/var/lib/warren-mesh/private.key"
SIMULATED_ENDPOINT_HOST: Final = "192.0.2.1"
SIMULATED_EXTERNAL_HOST: Final = "198.51.100.1"  # a simulated gateway candidate's external endpoint

MAX_RESTART_GRACE: Final = 3600


class SettingsError(ValueError):
    """A flag or environment value is wrong; the message names it and says what would be right."""


def env_default(flag: str, default: str | None) -> str | None:
    return os.environ.get("WARREN_MESH_" + flag.lstrip("-").upper().replace("-", "_"), default)


def add_flag(parser: argparse.ArgumentParser, flag: str, default: str | None, help: str) -> None:
    env = "WARREN_MESH_" + flag.lstrip("-").upper().replace("-", "_")
    parser.add_argument(flag, default=env_default(flag, default), help=f"{help} [env {env}; default {default}]")


def add_etcd_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--etcd-endpoints", DEFAULT_ETCD, "comma-separated etcd client URLs, tried in turn")
    add_flag(parser, "--etcd-ca-file", None, "CA that signed etcd's certificate (https endpoints)")
    add_flag(parser, "--etcd-cert-file", None, "client certificate for etcd; its common name is the etcd user")
    add_flag(parser, "--etcd-key-file", None, "the client certificate's key")


def etcd_tls_flags(args: argparse.Namespace, endpoints: tuple[str, ...]) -> EtcdTls | None:
    """The three ``--etcd-*-file`` flags, checked: files readable, certificate and key together, matching and in
    their validity period, and only with https endpoints."""
    ca, cert, key = (getattr(args, name, None) or None for name in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file"))
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise SettingsError("--etcd-cert-file and --etcd-key-file go together: give both or neither")
    plain = [e for e in endpoints if e.startswith("http://")]
    if plain:
        raise SettingsError(f"--etcd-endpoints {plain[0]} is plain http, but TLS files are given: use https://")
    for flag, value in (("--etcd-ca-file", ca), ("--etcd-cert-file", cert), ("--etcd-key-file", key)):
        if value is not None and not os.access(value, os.R_OK):
            raise SettingsError(f"{flag} {value!r} cannot be read")
    if cert is not None and key is not None:
        problem = credential_problem(Path(cert), Path(key))
        if problem is not None:
            raise SettingsError(f"--etcd-cert-file/--etcd-key-file: {problem}")
    return EtcdTls(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    add_etcd_flag(parser)
    add_flag(parser, "--prefix", DEFAULT_PREFIX, "etcd key prefix of this mesh")


def etcd_endpoints_flag(text: str) -> tuple[str, ...]:
    """``--etcd-endpoints`` as canonical URLs, or a SettingsError naming the flag."""
    try:
        return tuple(f"{'https' if e.secure else 'http'}://{e.target}" for e in parse_endpoints(text))
    except ValueError as exc:
        raise SettingsError(f"--etcd-endpoints: {exc}") from None


@dataclass(frozen=True, slots=True)
class StoreSettings:
    etcd_endpoints: tuple[str, ...]
    schema: KeySchema
    tls: EtcdTls | None = None
    # How often a long-running client looks for renewed certificate files (the agent: `warren-mesh enroll --watch`
    # or `certs renew` replaces them while it runs).
    tls_reload_interval: float = 60.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StoreSettings:
        endpoints = etcd_endpoints_flag(args.etcd_endpoints)
        try:
            schema = KeySchema(args.prefix)
        except ValueError as exc:
            raise SettingsError(f"--prefix: {exc}") from None
        return cls(endpoints, schema, etcd_tls_flags(args, endpoints))


@dataclass(frozen=True, slots=True)
class RegistrationSettings:
    """How this node appears in the mesh: its name, the endpoint peers dial, and how long it lingers if it dies."""

    node_name: str
    # One address per underlay family peers may dial, the preferred first; empty: the addresses of the default
    # routes' interfaces, of the families endpoint_family names.
    endpoint_hosts: tuple[str, ...]
    endpoint_port: int | None  # None: the mesh's listen port
    lease_ttl: int | None  # None: the mesh config's
    pod_subnet: IPNetwork | None = None  # None: claim a free one of the pod network
    restart_grace: int = 0  # seconds a stopped agent's node stays for its replacement (0: it leaves at once)
    # Which default routes give the endpoints when none is given: "auto" (IPv4's, else IPv6's), "ipv4", "ipv6"
    # or "dual" (both; a node with one of them only publishes that one).
    endpoint_family: str = "auto"
    location: str | None = None  # its zone or region (docs/topology.md); None: a location of its own
    # Where nodes of other locations dial it (one address per family, one port: the listen port when None); with
    # a location, it then stands as its location's gateway.
    external_hosts: tuple[str, ...] = ()
    external_port: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """The WireGuard device this agent drives."""

    interface: str
    backend: BackendName
    key_file: Path  # the device's private key, created (0600) if absent
    fwmark: int = 0
    resync_interval: float = 30.0  # seconds between full comparisons with the device
    cleanup_on_exit: bool = False
    wireguard_go: str | None = None  # the wireguard-go binary of the userspace backend (None: from PATH)
    start_wireguard_go: bool = True  # False: `warren-mesh wireguard-go` runs it and the agent adopts it
    rotate_key_every: float | None = None  # seconds between key rotations (None: as the mesh config says)


@dataclass(frozen=True, slots=True)
class PodSettings:
    """This node's pods: whether it routes for them (IP forwarding, the nftables table) and where they are told
    about the mesh (its CNI network config; None: nowhere)."""

    # Off for the simulated agents of tests and benchmarks: they share the host's network stack, which they
    # must not turn into a router.
    route: bool = False
    cni_conf_dir: Path | None = None
    cni_ipam_dir: str | None = None  # host-local's state directory (None: its default, /var/lib/cni/networks)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    address: str | None  # HOST:PORT of /metrics and /healthz; None: no HTTP endpoint
    # HOST:PORT of /healthz alone, for the kubelet's probes: on loopback no pod can reach it, so none can starve it.
    health_address: str | None = None
    # Seconds between device readings for the throughput gauges (0: none; a memory device has no traffic).
    traffic_sample_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything an agent is told, grouped by the part of it that uses it."""

    store: StoreSettings
    registration: RegistrationSettings
    device: DeviceSettings
    metrics: MetricsSettings
    pods: PodSettings = PodSettings()  # the simulated agents of tests and benchmarks have no pods

    @property
    def node_name(self) -> str:
        return self.registration.node_name

    @classmethod
    def simulated(
        cls,
        *,
        etcd_endpoint: str,
        prefix: str,
        name: str,
        key_dir: Path,
        port: int,
        interface: str = "wgsim",
        lease_ttl: int | None = None,
        resync_interval: float = 30.0,
        metrics_address: str | None = None,
        tls: EtcdTls | None = None,
        location: str | None = None,
        external: bool = False,
    ) -> AgentSettings:
        """An agent on the memory device (``etcd_endpoint``: one URL or several, comma-separated), "dialled" at
        192.0.2.1:``port``: the demo's, the tests' and the bench's; in ``location``, and ``external``: with an
        external endpoint (198.51.100.1:``port``), a gateway candidate.
        The addresses are from documentation ranges (RFC 5737): a memory device sends nothing, and peers refuse
        loopback endpoints."""
        external_hosts = (SIMULATED_EXTERNAL_HOST,) if external else ()
        return cls(
            store=StoreSettings(tuple(etcd_endpoint.split(",")), KeySchema(prefix), tls),
            registration=RegistrationSettings(
                name,
                (SIMULATED_ENDPOINT_HOST,),
                port,
                lease_ttl,
                location=location,
                external_hosts=external_hosts,
                external_port=port if external else None,
            ),
            device=DeviceSettings(interface, "memory", key_dir / f"{name}.key", resync_interval=resync_interval),
            metrics=MetricsSettings(metrics_address, traffic_sample_interval=0.0),
        )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_store_flags(parser)
        add_flag(parser, "--node-name", None, "this node's name in the mesh (default: the hostname)")
        add_flag(
            parser,
            "--endpoint",
            None,
            "IP[:PORT] peers dial, or one IPv4 and one IPv6, comma-separated, the preferred first (default: the "
            "default route's address, listen port)",
        )
        add_flag(
            parser,
            "--endpoint-family",
            "auto",
            "without --endpoint, which default routes give the endpoint: auto (IPv4's, else IPv6's), ipv4, ipv6, "
            "or dual (both)",
        )
        add_flag(
            parser,
            "--location",
            None,
            "this node's location (zone, region): a full mesh inside it, other locations through its gateway "
            "(default: none, a location of its own; docs/topology.md)",
        )
        add_flag(
            parser,
            "--external-endpoint",
            None,
            "IP[:PORT] nodes of other locations dial, or one of each family (default: none; with --location, "
            "this node may then be its location's gateway)",
        )
        add_flag(parser, "--interface", "wg-mesh", "WireGuard interface name")
        add_flag(parser, "--backend", "auto", "auto, kernel, userspace or memory")
        add_flag(
            parser,
            "--rotate-key-every",
            None,
            "make a new WireGuard key this often, e.g. 24h or 30m (default: the mesh's keyRotationIntervalHours)",
        )
        add_flag(parser, "--wireguard-go", None, "wireguard-go binary for the userspace backend (default: from PATH)")
        add_flag(
            parser,
            "--wireguard-go-runner",
            "agent",
            "who runs wireguard-go for the userspace backend: agent, or external (`warren-mesh wireguard-go` runs it, "
            "e.g. in a pod of its own, so that restarting the agent never stops it; the agent adopts it)",
        )
        add_flag(parser, "--key-file", DEFAULT_KEY_FILE, "private key file, created (0600) if absent")
        add_flag(parser, "--lease-ttl", None, "lease TTL in seconds (overrides the mesh config; default 10)")
        add_flag(
            parser,
            "--restart-grace",
            "0",
            "seconds this node stays in the mesh after the agent stops, for the agent that replaces it (a pod "
            "restart: its peers keep routing to it); 0: it leaves the mesh at once",
        )
        add_flag(
            parser,
            "--metrics-address",
            "0.0.0.0:9587",
            "HOST:PORT of /metrics and /healthz ('' to disable); in production the node's own address, not 0.0.0.0",
        )
        add_flag(
            parser,
            "--health-address",
            "",
            "HOST:PORT of /healthz alone ('' for none), for probes: 127.0.0.1:9588 is out of every pod's reach",
        )
        add_flag(parser, "--resync-interval", "30", "seconds between full comparisons with the device")
        add_flag(parser, "--fwmark", "0", "firewall mark on WireGuard's UDP packets (0: none), decimal or 0x hex")
        add_flag(parser, "--pod-subnet", None, "this node's pod subnet, pinned (default: claim a free one)")
        add_flag(parser, "--cni-conf-dir", "/etc/cni/net.d", "where the CNI network config for pods goes ('': none)")
        add_flag(parser, "--cni-ipam-dir", None, "host-local IPAM's state directory (default: the plugin's own)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentSettings:
        store = StoreSettings.from_args(args)
        name = args.node_name or socket.gethostname().split(".")[0].lower()
        try:
            validate_name(name)
        except RecordError as exc:
            raise SettingsError(f"--node-name: {exc}") from None
        hosts, port = _endpoint_flag(args.endpoint or "")
        external_hosts, external_port = _endpoint_flag(args.external_endpoint or "", flag="--external-endpoint")
        location = None
        if args.location:
            try:
                location = validate_location(args.location)
            except RecordError as exc:
                raise SettingsError(f"--location: {exc}") from None
        if args.endpoint_family not in ENDPOINT_FAMILIES:
            raise SettingsError(
                f"--endpoint-family {args.endpoint_family!r} is not one of {', '.join(ENDPOINT_FAMILIES)}"
            )
        if not args.interface or len(args.interface) > 15 or "/" in args.interface:
            raise SettingsError(f"--interface {args.interface!r} is not a Linux interface name (1-15 characters)")
        if args.backend not in BACKENDS:
            raise SettingsError(f"--backend {args.backend!r} is not one of {', '.join(BACKENDS)}")
        wireguard_go = args.wireguard_go or None
        if wireguard_go is not None and not os.access(wireguard_go, os.X_OK):
            raise SettingsError(f"--wireguard-go {wireguard_go!r} is not an executable file")
        if args.wireguard_go_runner not in ("agent", "external"):
            raise SettingsError(f"--wireguard-go-runner {args.wireguard_go_runner!r} is not agent or external")
        ttl = _int_flag("--lease-ttl", args.lease_ttl, low=MIN_LEASE_TTL) if args.lease_ttl else None
        restart_grace = _int_flag("--restart-grace", args.restart_grace, low=0)
        if restart_grace and not MIN_LEASE_TTL <= restart_grace <= MAX_RESTART_GRACE:
            raise SettingsError(f"--restart-grace {restart_grace} is not 0 or {MIN_LEASE_TTL}-{MAX_RESTART_GRACE} s")
        rotate_every = parse_duration("--rotate-key-every", args.rotate_key_every) if args.rotate_key_every else None
        metrics, health = args.metrics_address or None, args.health_address or None
        for flag, listen in (("--metrics-address", metrics), ("--health-address", health)):
            if listen is not None:
                try:
                    parse_listen_address(listen)
                except ValueError as exc:
                    raise SettingsError(f"{flag}: {exc}") from None
        resync = _int_flag("--resync-interval", args.resync_interval, low=1)
        try:
            fwmark = int(str(args.fwmark), 0)
        except ValueError:
            fwmark = -1
        if not 0 <= fwmark <= 0xFFFFFFFF:
            raise SettingsError(f"--fwmark {args.fwmark!r} is not a 32-bit number (decimal or 0x hex)")
        pod_subnet = None
        if args.pod_subnet:
            try:
                pod_subnet = ipaddress.ip_network(args.pod_subnet)
            except ValueError as exc:
                raise SettingsError(f"--pod-subnet {args.pod_subnet!r} is not a network in CIDR form: {exc}") from None
        return cls(
            store=store,
            registration=RegistrationSettings(
                name,
                hosts,
                port,
                ttl,
                pod_subnet,
                restart_grace,
                endpoint_family=args.endpoint_family,
                location=location,
                external_hosts=external_hosts,
                external_port=external_port,
            ),
            device=DeviceSettings(
                interface=args.interface,
                backend=cast(BackendName, args.backend),
                key_file=Path(args.key_file),
                fwmark=fwmark,
                resync_interval=float(resync),
                cleanup_on_exit=bool(getattr(args, "cleanup_on_exit", False)),
                wireguard_go=wireguard_go,
                start_wireguard_go=args.wireguard_go_runner == "agent",
                rotate_key_every=rotate_every,
            ),
            metrics=MetricsSettings(metrics, health_address=health),
            pods=PodSettings(
                route=True,
                cni_conf_dir=Path(args.cni_conf_dir) if args.cni_conf_dir else None,
                cni_ipam_dir=args.cni_ipam_dir or None,
            ),
        )


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    etcd_endpoints: tuple[str, ...]
    health_address: tuple[str, int] | None  # the liveness endpoint /healthz; None: none
    etcd_tls: EtcdTls | None = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_etcd_flag(parser)
        add_flag(parser, "--health-address", "0.0.0.0:8080", "HOST:PORT of the liveness endpoint /healthz; empty: none")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OperatorSettings:
        health = None
        if args.health_address:
            try:
                health = parse_listen_address(args.health_address)
            except ValueError as exc:
                raise SettingsError(f"--health-address: {exc}") from None
        endpoints = etcd_endpoints_flag(args.etcd_endpoints)
        return cls(endpoints, health, etcd_tls_flags(args, endpoints))


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(flag: str, value: str) -> float:
    """``90s``, ``30m``, ``24h``, ``7d``: at least a minute (a key rotation takes seconds)."""
    number, unit = value[:-1], value[-1:]
    if unit not in _DURATION_UNITS or not number.isdigit() or int(number) * _DURATION_UNITS[unit] < 60:
        raise SettingsError(f"{flag} {value!r} is not a duration of at least a minute (90s, 30m, 24h, 7d)")
    return float(int(number) * _DURATION_UNITS[unit])


ENDPOINT_FAMILIES = ("auto", "ipv4", "ipv6", "dual")


def _endpoint_flag(text: str, *, flag: str = "--endpoint") -> tuple[tuple[str, ...], int | None]:
    """``--endpoint`` (or ``flag``): one address, or one of each family (comma-separated, the preferred first),
    each with an optional port (the same for both: WireGuard listens on one)."""
    hosts: list[str] = []
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            address, port = split_host_port(item)
            if port is not None:
                ports.add(validate_port(port, what="port"))
        except RecordError as exc:
            raise SettingsError(f"{flag}: {exc}") from None
        problem = endpoint_problem(address)
        if problem is not None:
            raise SettingsError(f"{flag} {item!r} is not an address peers can dial: {problem}")
        hosts.append(str(address))
    if len(hosts) > 2 or len({":" in h for h in hosts}) != len(hosts):
        raise SettingsError(f"{flag} {text!r}: give one address, or one IPv4 and one IPv6 address")
    if len(ports) > 1:
        raise SettingsError(f"{flag} {text!r}: both endpoints take the same port (WireGuard listens on one)")
    return tuple(hosts), next(iter(ports), None)


def _int_flag(flag: str, value: str, *, low: int) -> int:
    if not str(value).isdigit() or int(value) < low:
        raise SettingsError(f"{flag} {value!r} is not a whole number of at least {low}")
    return int(value)
