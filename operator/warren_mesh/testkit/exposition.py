"""A Prometheus exposition read as plain numbers, for tests and benchmarks that look at etcd's or an agent's
counters (not for the product: `metrics/reading.py` reads agents' per-peer metrics properly)."""

from __future__ import annotations

import contextlib
import urllib.request


def scrape(url: str, *, prefix: str = "") -> dict[str, float]:
    """Every sample of the exposition at ``url`` whose series starts with ``prefix``, as series (labels included)
    -> value; {} while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (our own processes, on loopback)
            text = response.read().decode()
    except OSError:
        return {}
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                series[name] = float(value)
    return series
