"""Addresses of every kind the project parses: IP types and the fast IP parser every record decode uses, etcd's
client URLs and HTTP listen addresses. The lowest floor: nothing of ours is imported here, so settings, the store
and the model can all use it without pulling in gRPC or an HTTP server."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address(text)``, IPv4 through the C parser: every node record carries two addresses and its
    reservation a third, and the Python parser was the largest part of decoding a record. glibc's inet_pton
    accepts exactly the dotted quads Python does (no leading zeros, no short forms); anything else, IPv6
    included, goes to the Python parser, which also raises ValueError for invalid text as before."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        return ipaddress.ip_address(text)
    except (TypeError, ValueError):  # not a str, or one with a NUL byte: inet_pton's errors, not ours
        raise ValueError(f"{text!r} is not an IP address") from None


def ip_text(ip: IPAddress) -> str:
    """``str(ip)``, IPv4 through the C formatter: every record decoded makes the text of its addresses (and the
    fold compares them), and Python's formatter was a twentieth of a simulated agent's CPU in a storm."""
    if ip.version == 4:
        return socket.inet_ntop(socket.AF_INET, ip.packed)
    return str(ip)


def network_text(network: IPNetwork) -> str:
    """``str(network)``, IPv4 through the C formatter."""
    return f"{ip_text(network.network_address)}/{network.prefixlen}"


def parse_network(text: str) -> IPNetwork:
    """``ipaddress.ip_network(text)`` (strict): an IPv4 network in CIDR form through the C parser (a node record
    and its pod subnet's claim each carry one, and Python's parser took three times as long as the rest of
    making it); any other form (IPv6, a netmask, a leading zero, host bits set) goes to ``ipaddress``, which
    also raises ValueError for invalid text as before."""
    address, slash, length = text.partition("/")
    if slash and 0 < len(length) <= 2 and length.isascii() and length.isdigit() and (length[0] != "0" or length == "0"):
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        except (OSError, TypeError, ValueError):
            pass
        else:
            prefix = int(length)
            if prefix <= 32 and not value & ((1 << (32 - prefix)) - 1):
                return ipaddress.IPv4Network((value, prefix))
    return ipaddress.ip_network(text)


@dataclass(frozen=True, slots=True)
class EtcdEndpoint:
    target: str  # host:port for gRPC
    secure: bool

    @property
    def host(self) -> str:
        """The host name or address alone (IPv6 without brackets)."""
        return self.target.rsplit(":", 1)[0].strip("[]")

    @classmethod
    def parse(cls, url: str) -> EtcdEndpoint:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"etcd endpoint {url!r} is not of the form http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {url!r} has an invalid port") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return cls(f"{host}:{port}", parts.scheme == "https")


def parse_endpoints(text: str | Sequence[str]) -> tuple[EtcdEndpoint, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    endpoints = tuple(EtcdEndpoint.parse(item) for item in items if item.strip())
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``; raises ValueError with a readable message."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT or [IPv6]:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
