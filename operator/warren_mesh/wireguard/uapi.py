"""wireguard-go's control protocol (the cross-platform "UAPI"), spoken directly over its unix socket.

The protocol is line-based text: ``get=1`` answers with the whole device, ``set=1`` takes a list of changes that
apply to the peer named by the last ``public_key=`` line. Keys travel in hex. Every answer ends with
``errno=N`` and an empty line. We never run the ``wg`` tool: one socket round trip per change is faster and leaves
no output to parse.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from warren_mesh.values.device import PeerSpec, PeerStats

SOCKET_DIR = Path("/var/run/wireguard")


class UapiError(RuntimeError):
    pass


def socket_path(interface: str) -> Path:
    return SOCKET_DIR / f"{interface}.sock"


def key_to_hex(key: str) -> str:
    return base64.b64decode(key).hex()


def hex_to_key(text: str) -> str:
    return base64.b64encode(bytes.fromhex(text)).decode()


@dataclass
class UapiDevice:
    """What ``get=1`` reports, with keys in base64 like everywhere else in the code."""

    private_key: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[str, PeerSpec] = field(default_factory=dict)
    stats: dict[str, PeerStats] = field(default_factory=dict)


def _exchange(path: Path, request: str, timeout: float) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise UapiError(f"cannot reach wireguard-go at {path}: {exc.strerror or exc}") from None
        sock.sendall(request.encode())
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"".join(chunks[-2:]).endswith(b"\n\n"):
                break
    return b"".join(chunks).decode()


def _check_errno(answer: str, what: str) -> list[str]:
    lines = answer.rstrip("\n").split("\n")
    if not lines or not lines[-1].startswith("errno="):
        raise UapiError(f"{what}: wireguard-go gave no status (answer {answer[-80:]!r})")
    errno = int(lines[-1][len("errno=") :])
    if errno != 0:
        raise UapiError(f"{what}: wireguard-go answered errno {errno}")
    return lines[:-1]


@dataclass
class _PeerLines:
    """The lines of one peer in a ``get=1`` answer, gathered until the next peer starts."""

    public_key: str
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    keepalive: int = 0
    rx: int = 0
    tx: int = 0
    handshake_sec: int = 0
    handshake_nsec: int = 0

    def take(self, name: str, value: str) -> None:
        if name == "endpoint":
            self.endpoint = value or None
        elif name == "allowed_ip":
            self.allowed_ips.append(value)
        elif name == "persistent_keepalive_interval":
            self.keepalive = int(value)
        elif name == "rx_bytes":
            self.rx = int(value)
        elif name == "tx_bytes":
            self.tx = int(value)
        elif name == "last_handshake_time_sec":
            self.handshake_sec = int(value)
        elif name == "last_handshake_time_nsec":
            self.handshake_nsec = int(value)

    def add_to(self, device: UapiDevice) -> None:
        key = self.public_key
        device.peers[key] = PeerSpec(key, self.endpoint, tuple(sorted(self.allowed_ips)), self.keepalive)
        device.stats[key] = PeerStats(self.rx, self.tx, self.handshake_sec + self.handshake_nsec / 1e9)


def get(path: Path, *, timeout: float = 5.0) -> UapiDevice:
    device = UapiDevice()
    peer: _PeerLines | None = None
    for line in _check_errno(_exchange(path, "get=1\n\n", timeout), "get"):
        name, _, value = line.partition("=")
        if name == "public_key":
            if peer is not None:
                peer.add_to(device)
            peer = _PeerLines(hex_to_key(value))
        elif peer is not None:
            peer.take(name, value)
        elif name == "private_key":
            device.private_key = hex_to_key(value)
        elif name == "listen_port":
            device.listen_port = int(value)
        elif name == "fwmark":
            device.fwmark = int(value)
    if peer is not None:
        peer.add_to(device)
    return device


def set_lines(path: Path, lines: Iterable[str], *, what: str, timeout: float = 5.0) -> None:
    request = "set=1\n" + "".join(line + "\n" for line in lines) + "\n"
    _check_errno(_exchange(path, request, timeout), what)


def peer_lines(spec: PeerSpec, adding: tuple[str, ...] | None = None) -> list[str]:
    """Add or update one peer in place, its session kept: its allowed IPs replaced by ``spec``'s, or (``adding``)
    only these added to the ones it has."""
    lines = [f"public_key={key_to_hex(spec.public_key)}"]
    if adding is None:
        lines.append("replace_allowed_ips=true")
    if spec.endpoint is not None:
        lines.append(f"endpoint={spec.endpoint}")
    lines.append(f"persistent_keepalive_interval={spec.persistent_keepalive}")
    lines.extend(f"allowed_ip={net}" for net in (spec.allowed_ips if adding is None else adding))
    return lines


def remove_peer_lines(public_key: str) -> list[str]:
    return [f"public_key={key_to_hex(public_key)}", "remove=true"]
