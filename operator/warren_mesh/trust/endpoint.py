"""An underlay endpoint, as WireGuard dials it: an IP literal and a UDP port."""

from __future__ import annotations

from dataclasses import dataclass

from warren_mesh.trust.fields import split_host_port, validate_port
from warren_mesh.trust.networks import endpoint_problem
from warren_mesh.trust.reasons import REASON_INVALID_ENDPOINT, RecordError
from warren_mesh.trust.text import printable
from warren_mesh.values.netaddr import IPAddress, ip_text


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An underlay address WireGuard dials: an IP literal and a UDP port (WireGuard resolves no names)."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{ip_text(self.host)}:{self.port}"

    @classmethod
    def parse(cls, text: object, *, default_port: int | None = None) -> Endpoint:
        """Parse ``IP:PORT`` or ``[IPv6]:PORT`` of a remote peer; a bare IP takes ``default_port`` when one is
        given. Addresses no remote peer can have (loopback, multicast, link-local, ...) are refused."""
        host, port = split_host_port(text)
        if port is None:
            if default_port is None:
                raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(str(text))} has no port")
            port = default_port
        problem = endpoint_problem(host)
        if problem is not None:
            raise RecordError(REASON_INVALID_ENDPOINT, f"endpoint {printable(str(text))}: {problem}")
        return cls(host, validate_port(port, what="endpoint port", reason=REASON_INVALID_ENDPOINT))
