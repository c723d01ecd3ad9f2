"""What a watch delivers: plain key-values, and results that are either events or a complete snapshot.

A watch result is either a batch of events or, after a compaction lost the history a resume needed, a complete
snapshot. Consumers fold both through one model (``mesh.view.MeshView``), which is what makes a reconnect safe:
there is never a gap between "what I had" and "what is there now" that code must special-case. These values sit
below both ``store/`` (which produces them) and ``mesh/`` (which consumes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0
    # A value too large to be a record is never kept (store/wire.py drops it while decoding, a paged listing skips
    # it by key): ``value`` is then empty and this is its size, or a size it is known to exceed.
    oversize: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KeyValue  # for a delete: the key and the revision of the delete, value empty


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under the watched prefix as of ``revision``."""

    items: tuple[KeyValue, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Events:
    """Changes in revision order; ``revision`` is that of the last one."""

    events: tuple[Event, ...]
    revision: int


WatchResult = Snapshot | Events
