"""This node's WireGuard key in use: one holder that the registrar (publishes its public half), the device writer
(installs it) and key rotation (replaces it) share, so that no part can go on using a key the others dropped."""

from __future__ import annotations

from warren_mesh.identity.keys import NodeKey


class Identity:
    def __init__(self, key: NodeKey) -> None:
        self.key = key

    @property
    def public_key(self) -> str:
        return self.key.public_key
