"""What a WireGuard device is configured with and what it reports, as plain values.

These sit below both ``mesh/`` (which computes the desired device) and ``wireguard/`` (which reads and writes real
ones), so the two never import each other. Keys are base64 strings, networks and endpoints canonical strings:
equality of two values is exactly "the device would not change".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    # Overlay addresses with their networks' prefix lengths, one per family, IPv4 first: ("10.96.0.5/16",
    # "fd96::5/64"). Sorted so, equal specs are equal devices.
    addresses: tuple[str, ...]
    listen_port: int
    mtu: int
    fwmark: int = 0  # mark on WireGuard's own UDP packets, for hosts whose policy routing needs it; 0 is none


@dataclass(frozen=True, slots=True)
class PeerSpec:
    public_key: str
    endpoint: str | None  # "IP:PORT" or "[IPv6]:PORT"; None for a peer that dials us
    allowed_ips: Sequence[str]  # canonical CIDR strings, sorted
    persistent_keepalive: int = 0  # seconds; 0 is off


@dataclass(frozen=True, slots=True)
class PeerStats:
    receive_bytes: int = 0
    transmit_bytes: int = 0
    last_handshake: float = 0.0  # unix time; 0 means never


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device as read back from the kernel, wireguard-go or memory."""

    public_key: str | None
    interface: InterfaceSpec | None
    peers: Mapping[str, PeerSpec] = field(default_factory=dict)
    stats: Mapping[str, PeerStats] = field(default_factory=dict)
    # Destinations (canonical CIDR text) of the routes the mesh owns through the device: routing protocol 158 on
    # real devices. Routes of anyone else are not the mesh's to read, compare or change.
    routes: frozenset[str] = frozenset()
