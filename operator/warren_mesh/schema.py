"""The etcd key layout, in one place (documented in docs/etcd-keys.md).

Everything lives below ``<prefix>/v1/`` so one watch sees the whole mesh in one revision order, and a future
schema can live beside this one under ``v2/`` during an upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

DEFAULT_PREFIX: Final = "/warren/mesh"

KeyKind = Literal["config", "node", "ipam", "peer"]


@dataclass(frozen=True, slots=True)
class KeySchema:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix {self.prefix!r} must start with '/' and not end with '/'")

    @property
    def root(self) -> str:
        return f"{self.prefix}/v1/"

    @property
    def config(self) -> str:
        return f"{self.root}config"

    @property
    def nodes(self) -> str:
        return f"{self.root}nodes/"

    @property
    def ipam(self) -> str:
        return f"{self.root}ipam/"

    @property
    def peers(self) -> str:
        return f"{self.root}peers/"

    def node(self, name: str) -> str:
        return self.nodes + name

    def address(self, address: str) -> str:
        return self.ipam + address

    def peer(self, name: str) -> str:
        return self.peers + name

    def classify(self, key: str) -> tuple[KeyKind, str] | None:
        """Which kind of key this is and its name part; None for keys this version does not know."""
        if key == self.config:
            return "config", ""
        for kind, start in (("node", self.nodes), ("ipam", self.ipam), ("peer", self.peers)):
            if key.startswith(start) and len(key) > len(start):
                return kind, key[len(start) :]  # type: ignore[return-value]
        return None
