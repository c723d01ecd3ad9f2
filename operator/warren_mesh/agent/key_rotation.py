"""Hitless key rotation: this node makes a new WireGuard key and moves its peers to it (docs/key-rotation.md).

A WireGuard device has one private key and its peers know it by the public half, so a new key cannot simply
replace the old one: a peer that does not know it drops the node's handshakes and tries again only 5 s later,
and a peer that knows it too early routes to a key nobody answers yet. So, in this order:

1. Make the key, kept beside the key file (``<key file>.next``, 0600) until it is installed.
2. Announce it: our record names it ``next_public_key``; every peer adds a second peer for us with that key and
   no allowed IPs (our addresses stay with the key in use), so our first handshake with it will be answered.
3. After a grace period (peers' watch and reconcile take milliseconds), install it: the key file takes the new
   key and the old key's bytes are overwritten on disk.
4. Switch the device. Sessions stay readable on both sides; what we send next starts a handshake with the new
   key, which the announced peer answers.
5. Publish our record with the new key: every peer gives our addresses to the new key's peer and drops the old.

Between 4 and 5 (etcd's round trip and the peers' reconcile) a peer receives our packets on the new session but
does not yet route our addresses to it: that is the worst case, a few tens of milliseconds. Peers not involved
see nothing at all. A run that stops between 1 and 3 leaves the old key in use everywhere (the ``.next`` file is
discarded at start); one that stops between 3 and 5 starts with the new key and publishes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from warren_mesh.agent.publication import RecordPublisher
from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.identity import keys
from warren_mesh.identity.keys import NodeKey
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.store.base import Backoff, StoreError
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.reasons import RecordError

log = logging.getLogger(__name__)

# Long enough for every peer to see the announcement and add the key (milliseconds when etcd is healthy), short
# enough that a rotation is over in seconds.
ANNOUNCE_GRACE = 2.0


class KeyRotation:
    def __init__(
        self,
        *,
        key_file: Path,
        publication: RecordPublisher,
        reconciler: Reconciler,
        metrics: AgentMetrics,
        grace: float = ANNOUNCE_GRACE,
    ) -> None:
        self._key_file = key_file
        self._publication = publication
        self._reconciler = reconciler
        self._metrics = metrics
        self._grace = grace

    def key_created_at(self) -> float:
        """When the key in use was made (the key file's modification time)."""
        return self._key_file.stat().st_mtime

    async def rotate(self, why: str) -> NodeKey:
        """Move this node to a new key, as the module's docstring says; the new key."""
        started = time.monotonic()
        key = NodeKey.generate()
        try:
            await asyncio.to_thread(keys.write_pending, self._key_file, key)
            log.info("key rotation (%s): announcing %s…", why, key.public_key[:10])
            await self._publication.announce_key(key.public_key)
            await asyncio.sleep(self._grace)
            await asyncio.to_thread(keys.install_pending, self._key_file)
        except BaseException:
            # Nothing switched: the old key stays in use; peers drop the announced one with our next publish.
            self._publication.withdraw_announcement()
            await asyncio.to_thread(keys.discard_pending, self._key_file)
            raise
        if not await self._reconciler.switch_key(key):
            # The device refused something: the next passes retry it (the key is the node's from now on).
            log.warning("key rotation: the device did not take everything at once; the next pass retries")
        # The device has the new key: until peers see it published, what we send them is dropped. Keep trying.
        backoff = Backoff(initial=0.2, maximum=2.0)
        while True:
            try:
                await self._publication.publish_switched_key()
                break
            except StoreError as exc:
                log.warning("key rotation: publishing the new key failed (retrying): %s", exc)
                await asyncio.sleep(backoff.delay())
        self._metrics.key_rotations.inc()
        log.info("key rotation done in %.1f s: this node is %s… now", time.monotonic() - started, key.public_key[:10])
        return key


def rotation_request(value: bytes) -> float:
    """When a key rotation was asked for: ``{"requested_at": <Unix time>}`` under rotate/<node> (written by
    `warren-mesh rotate-key`). RecordError if the value says no such thing."""
    doc = decode_json(value)
    requested_at = doc.get("requested_at") if isinstance(doc, dict) else None
    if isinstance(requested_at, bool) or not isinstance(requested_at, int | float):
        raise RecordError("invalid_field", "requested_at is not a number")
    return float(requested_at)
