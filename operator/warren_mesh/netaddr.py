"""IP address types and the fast parser every record decode uses (the lowest floor: no other import of ours)."""

from __future__ import annotations

import ipaddress
import socket

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
