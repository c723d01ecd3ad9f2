"""What the lab tests share: a lab of this test's own, taken down whatever happens (its logs kept with the test's
files), and nothing of it left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from warren_mesh.lab import netns
from warren_mesh.lab.lab import Lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(prefix=f"wt{os.getpid() % 100000}", state_dir=tmp_path / "lab")
    try:
        yield lab
    finally:
        lab.down(keep_logs=tmp_path / "logs")
    assert (
        not [n for n in os.listdir("/var/run/netns") if n.startswith(lab.prefix)]
        if os.path.isdir("/var/run/netns")
        else True
    )


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """Two namespaces of this test's own joined by a veth pair: 192.168.251.1 and .2."""
    tag = f"wmt{os.getpid() % 10000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        netns.create(a)
        netns.create(b)
        netns.veth(f"{tag}va", f"{tag}vb", ns=a, peer_ns=b)
        netns.address(f"{tag}va", "192.168.251.1/24", ns=a)
        netns.address(f"{tag}vb", "192.168.251.2/24", ns=b)
        yield a, b
    finally:
        netns.remove(a)
        netns.remove(b)
