"""The etcd key layout, in one place (documented in docs/etcd-keys.md).

Everything lives below ``<prefix>/v1/`` so one watch sees the whole mesh in one revision order, and a future
schema can live beside this one under ``v2/`` during an upgrade.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

DEFAULT_PREFIX: Final = "/warren/mesh"
# The version of the documents under this layout (every record says it; a reader refuses another).
SCHEMA_VERSION: Final = 1

KeyKind = Literal["config", "node", "claim", "ipam", "peer"]
# What a node claims under its own claims/ directory: its overlay address, its pod subnet.
ClaimKind = Literal["overlay", "pods"]
CLAIM_KINDS: Final[frozenset[str]] = frozenset({"overlay", "pods"})


class ClaimKey(NamedTuple):
    node: str
    kind: str
    value: str


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

    def key_rotation(self, node: str) -> str:
        """A request (from `warren-mesh rotate-key`) that ``node`` make a new WireGuard key; only it acts on it."""
        return f"{self.root}rotate/{node}"

    def suspension(self, node: str) -> str:
        """The mark of a node whose write permissions were taken away (store/roles.py); only the admin writes it."""
        return f"{self.suspended}{node}"

    @property
    def suspended(self) -> str:
        return f"{self.root}suspended/"

    @property
    def claims(self) -> str:
        return f"{self.root}claims/"

    def claims_of(self, node: str) -> str:
        """The directory only ``node`` (and the admin) may write: what the node claims of the mesh's networks."""
        return f"{self.claims}{node}/"

    def claim(self, node: str, address: str, kind: ClaimKind = "overlay") -> str:
        """``node``'s claim on an overlay address, or (``kind="pods"``) on a pod subnet such as 10.244.3.0/24."""
        return f"{self.claims_of(node)}{kind}/{address.replace('/', '-') if kind == 'pods' else address}"

    def candidacies_of(self, node: str) -> str:
        """The directory of ``node``'s gateway candidacies (mesh/candidacies.py): one, for its location."""
        return f"{self.claims_of(node)}gateway/"

    def candidacy(self, node: str, location: str) -> str:
        """``node`` stands as the gateway of ``location`` (on its lease)."""
        return f"{self.candidacies_of(node)}{location}"

    @staticmethod
    def claim_subject(kind: str, value: str) -> str:
        """What a claim key's last segment claims, as the records name it: an address, or a subnet with its '/'
        (a key segment cannot hold one: 10.244.3.0-24 is 10.244.3.0/24)."""
        return value.replace("-", "/") if kind == "pods" else value

    @property
    def locations(self) -> str:
        """Where the operator says each Kubernetes node's location (its Node's topology label, docs/topology.md)."""
        return f"{self.root}locations/"

    def location(self, node: str) -> str:
        return f"{self.locations}{node}"

    @property
    def ipam(self) -> str:
        """Reservations of schema v1 before node-owned claims: read (and migrated), never written any more."""
        return f"{self.root}ipam/"

    @property
    def peers(self) -> str:
        return f"{self.root}peers/"

    def node(self, name: str) -> str:
        return self.nodes + name

    def legacy_reservation(self, address: str) -> str:
        return self.ipam + address

    def peer(self, name: str) -> str:
        return self.peers + name

    @staticmethod
    def split_claim(name: str) -> ClaimKey | None:
        """``<node>/<kind>/<value>`` (the name part of a claim key) in its parts; None if it has not three."""
        parts = name.split("/")
        if len(parts) != 3:
            return None
        return ClaimKey(*parts)

    def claim_key(self, key: str) -> ClaimKey | None:
        """A full key's parts if it is a claim (``<root>claims/<node>/<kind>/<value>``); else None."""
        kind = self.classify(key)
        return self.split_claim(kind[1]) if kind is not None and kind[0] == "claim" else None

    def classify(self, key: str) -> tuple[KeyKind, str] | None:
        """Which kind of key this is and its name part; None for keys this version does not know."""
        config, kinds = _kinds(self.root)
        if key == config:
            return "config", ""
        for kind, start in kinds:
            if key.startswith(start) and len(key) > len(start):
                return kind, key[len(start) :]
        return None


@functools.lru_cache(maxsize=16)
def _kinds(root: str) -> tuple[str, tuple[tuple[KeyKind, str], ...]]:
    """The config key under ``root``, and the directory of each kind of key: made once per prefix, not per key
    (every key of a snapshot or a watch answer is classified)."""
    return f"{root}config", (
        ("node", f"{root}nodes/"),
        ("claim", f"{root}claims/"),
        ("ipam", f"{root}ipam/"),
        ("peer", f"{root}peers/"),
    )
