"""The networks routed to one peer, in the two forms deciding needs: canonical text and integer ranges.

Worked out once when a record is decoded (``NodeRecord``, ``ExternalPeer``), so that folding the mesh on every
change never builds ipaddress objects or strings again.
"""

from __future__ import annotations

from dataclasses import dataclass

from warren_mesh.values.netaddr import IPAddress, IPNetwork


@dataclass(frozen=True, slots=True)
class Routes:
    """The networks routed to one peer, worked out once when its record is decoded: canonical text sorted (what the
    device is given and compared with) and, in the same order, integer ranges (for overlap checks). Deciding runs
    on every change for every peer, so nothing there may build ipaddress objects or strings again."""

    text: tuple[str, ...]
    ranges: tuple[tuple[int, int, int, int], ...]  # (IP version, prefix length, first, last address)

    @classmethod
    def of(
        cls, networks: tuple[IPNetwork, ...], *, host: IPAddress | None = None, host_text: str | None = None
    ) -> Routes:
        """``networks`` (disjoint, none covering ``host``: the decoders make sure), and ``host`` as a /32 or /128.
        The host's is built from the address directly (parsing it back as a network text was most of decoding a
        node record). ``host_text``: ``str(host)``, if at hand."""
        entries = [
            (str(n), (n.version, n.prefixlen, int(n.network_address), int(n.broadcast_address))) for n in networks
        ]
        if host is not None:
            value = int(host)
            text = str(host) if host_text is None else host_text
            entries.append((f"{text}/{host.max_prefixlen}", (host.version, host.max_prefixlen, value, value)))
        entries.sort(key=lambda entry: entry[0])
        return cls(tuple(text for text, _ in entries), tuple(span for _, span in entries))
