"""Renumbering: a mesh config that would leave registered nodes outside its networks is refused, by agents and the
operator alike (a live mesh is not renumbered by an edit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from warren_mesh.trust.records import MeshConfig, NodeRecord


class _Registered(Protocol):
    @property
    def record(self) -> NodeRecord: ...


def renumbering_refusal(config: MeshConfig, nodes: Mapping[str, _Registered], current: MeshConfig) -> str | None:
    """Why ``config`` may not replace ``current`` while ``nodes`` are registered (its networks would leave out
    some that fit now: an address, a pod network or an endpoint that no longer fits), or None. Nodes that do not
    fit the current config either count for nothing: a bad record must not freeze the config. Agents and the
    operator refuse such a config alike."""
    outside = sorted(
        name for name, entry in nodes.items() if not config.fits(entry.record) and current.fits(entry.record)
    )
    if not outside:
        return None
    shown = ", ".join(outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
    return (
        f"overlay networks {', '.join(map(str, config.overlay_cidrs))} and pod networks "
        f"{', '.join(map(str, config.pod_cidrs))} would leave out {len(outside)} registered node(s) ({shown}); a "
        "live mesh is not renumbered by a config edit: widen the networks or add a family instead, or change them "
        "once those nodes have left"
    )
