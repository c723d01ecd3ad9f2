"""The networks routed to one peer, in the two forms deciding needs: canonical text and integer ranges.

Worked out once when a record is decoded (``NodeRecord``, ``ExternalPeer``), so that folding the mesh on every
change never builds ipaddress objects or strings again.
"""

from __future__ import annotations

from dataclasses import dataclass

from warren_mesh.values.netaddr import IPAddress, IPNetwork, network_text


@dataclass(frozen=True, slots=True)
class Routes:
    """The networks routed to one peer, worked out once when its record is decoded: canonical text sorted (what the
    device is given and compared with) and, in the same order, integer ranges (for overlap checks). Deciding runs
    on every change for every peer, so nothing there may build ipaddress objects or strings again."""

    text: tuple[str, ...]
    ranges: tuple[tuple[int, int, int, int], ...]  # (IP version, prefix length, first, last address)

    @classmethod
    def of(
        cls,
        networks: tuple[IPNetwork, ...],
        *,
        hosts: tuple[IPAddress, ...] = (),
        host_texts: tuple[str, ...] | None = None,
    ) -> Routes:
        """``networks`` (disjoint, none covering a host: the decoders make sure), and each of ``hosts`` as a /32 or
        /128. A host's is built from the address directly (parsing it back as a network text was most of decoding
        a node record). ``host_texts``: ``str()`` of each host, if at hand."""
        entries = [
            (network_text(n), (n.version, n.prefixlen, int(n.network_address), int(n.broadcast_address)))
            for n in networks
        ]
        texts = tuple(str(host) for host in hosts) if host_texts is None else host_texts
        for host, text in zip(hosts, texts, strict=True):
            value = int(host)
            entries.append((f"{text}/{host.max_prefixlen}", (host.version, host.max_prefixlen, value, value)))
        entries.sort(key=lambda entry: entry[0])
        return cls(tuple(text for text, _ in entries), tuple(span for _, span in entries))
