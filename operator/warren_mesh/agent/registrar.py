"""This node's place in the mesh: a stable overlay address and a node record that lives exactly as long as we do.

The address is claimed under ``claims/<node>/overlay/<address>``, a key only this node may write (with etcd's
auth on, docs/security.md). Two nodes may claim one address; the older claim (lower create revision) holds it,
the same on every node, and the younger claimant sees that right after it wrote its claim and moves on. Claims
never expire, so a node gets the same address after any restart. Liveness is separate: the node record sits on a
short lease that we keep alive every TTL/3; if we die, etcd deletes the record when the lease runs out and every
peer drops us. A record for our name that carries another public key belongs to someone else and is never
overwritten.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from warren_mesh.admission import usable_host_range
from warren_mesh.keys import NodeKey
from warren_mesh.mesh.peers import MeshView
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.model import MeshConfig, NodeRecord, encode_json
from warren_mesh.netaddr import IPAddress, IPNetwork, parse_ip
from warren_mesh.schema import KeySchema
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.base import Backoff, LeaseNotFound, Store, StoreError, StoreUnavailable, lease_refresh_interval
from warren_mesh.validation import Endpoint, RecordError, decode_json
from warren_mesh.watch import Snapshot

log = logging.getLogger(__name__)


class RegistrationConflict(RuntimeError):
    """Our node name is held by a record we must not overwrite."""


class AddressSpaceExhausted(RuntimeError):
    """Every address of the mesh network is reserved."""


@dataclass(frozen=True, slots=True)
class Registration:
    record: NodeRecord
    lease_id: int
    ttl: int


class Registrar:
    def __init__(
        self,
        settings: RegistrationSettings,
        *,
        store: Store,
        schema: KeySchema,
        key: NodeKey,
        endpoint_host: IPAddress,
        metrics: AgentMetrics,
    ) -> None:
        """``endpoint_host``: the settings' endpoint address, or the one found on this host when they name none."""
        self._store = store
        self._schema = schema
        self._name = settings.node_name
        self._key = key
        self._endpoint_host = endpoint_host
        self._endpoint_port = settings.endpoint_port  # None: follow the mesh's listen port
        self._lease_ttl = settings.lease_ttl  # None: the mesh config's TTL
        self._metrics = metrics
        self.current: Registration | None = None
        self._published = b""  # the exact value of our record in etcd, to notice when someone changes it
        self._holder: asyncio.Task[None] | None = None  # keeps the current lease alive; ends when etcd drops it

    # --- address ----------------------------------------------------------------------------------------------

    async def _claims(self) -> MeshView:
        """Every claim on an overlay address, judged as every agent judges them (including the ``ipam/``
        reservations of a mesh not migrated yet)."""
        claims = await self._store.list_prefix(self._schema.claims)
        legacy = await self._store.list_prefix(self._schema.ipam)
        view = MeshView(self._schema)
        view.apply(Snapshot(claims.items + legacy.items, max(claims.revision, legacy.revision)))
        return view

    async def _held_address(self, cidr: IPNetwork) -> tuple[IPAddress | None, set[int]]:
        """The address we hold in ``cidr`` (None if none) and every address someone else holds. Our claims that
        lost to an older one are withdrawn; an address we hold only through a reservation of the old schema gets a
        claim of ours (so a migrated mesh keeps every node's address)."""
        view = await self._claims()
        held: IPAddress | None = None
        taken: set[int] = set()
        for address, holder in view.reservations.items():
            ip = parse_ip(address)
            if holder.owner != self._name:
                taken.add(int(ip))
                for claim in view.claims_on(address):
                    if claim.key == self._schema.claim(self._name, address):
                        log.warning("withdrawing the claim of %s on %s: %s holds it", self._name, ip, holder.owner)
                        await self._store.delete(claim.key)
            elif ip in cidr and (held is None or int(ip) < int(held)):
                held = ip
        if held is not None:
            await self._store.create(self._schema.claim(self._name, str(held)), b"")  # no-op once it is there
        return held, taken

    def _candidates(self, cidr: IPNetwork, taken: set[int]) -> Iterator[IPAddress]:
        first, last = usable_host_range(cidr)
        size = last - first + 1
        # Start where the name hashes to: nodes joining at once rarely race for the same address, and a node
        # whose reservation was lost tends to get its old address back.
        start = int.from_bytes(hashlib.sha256(self._name.encode()).digest()[:8], "big") % size
        for step in range(size):
            candidate = first + (start + step) % size
            if candidate not in taken:
                yield ipaddress.ip_address(candidate)

    # --- registration -----------------------------------------------------------------------------------------

    def _record(self, config: MeshConfig, overlay_ip: IPAddress) -> NodeRecord:
        port = config.listen_port if self._endpoint_port is None else self._endpoint_port
        return NodeRecord(
            name=self._name,
            public_key=self._key.public_key,
            endpoint=Endpoint(self._endpoint_host, port),
            overlay_ip=overlay_ip,
            listen_port=config.listen_port,
            published_at=time.time(),
        )

    async def register(self, config: MeshConfig, overlay_ip: IPAddress | None = None) -> Registration:
        """Publish our record on a fresh lease, at ``overlay_ip`` or else at the address we hold, reserving one
        the first time (stable across restarts); take over a record of ours left by a previous run."""
        ttl = self._lease_ttl if self._lease_ttl is not None else config.lease_ttl_seconds
        taken: set[int] = set()
        if overlay_ip is None:
            overlay_ip, taken = await self._held_address(config.overlay_cidr)
        lease_id = await self._store.grant_lease(ttl)
        # Held from this moment, not from when the record is written: with a thousand nodes starting at once,
        # registering took several seconds, and a lease refreshed only after that expired before its first refresh.
        holder = asyncio.get_running_loop().create_task(self._hold(lease_id, ttl), name=f"lease-{lease_id:x}")
        # Records are stamped after the lease grant: published_at is when the record is written, so measured
        # convergence lag is the mesh's reaction time, not our own registration round trips.
        key = self._schema.node(self._name)
        try:
            if overlay_ip is None:
                record = await self._reserve_and_publish(config, taken, lease_id)
            else:
                record = await self._publish(self._record(config, overlay_ip), lease_id)
        except LeaseNotFound:
            # The new lease ran out before the record was written: etcd or this agent stalled for longer than the
            # TTL. Nothing is wrong with the registration itself, so callers retry it like an unreachable etcd.
            holder.cancel()
            raise StoreUnavailable(f"lease {lease_id:x} expired before {key} was written; registering again") from None
        except BaseException:
            holder.cancel()
            await asyncio.shield(self._revoke_quietly(lease_id))
            raise
        if self._holder is not None:
            self._holder.cancel()  # the previous lease's: etcd dropped it, or we are moving off it
        self._holder = holder
        self.current = Registration(record, lease_id, ttl)
        self._published = encode_json(record.to_json())
        self._metrics.registrations.inc()
        log.info(
            "registered %s as %s at %s (lease %x, ttl %d s)",
            self._name,
            record.overlay_ip,
            record.endpoint,
            lease_id,
            ttl,
        )
        return self.current

    async def _reserve_and_publish(self, config: MeshConfig, taken: set[int], lease_id: int) -> NodeRecord:
        """Claim a free address and publish our record at it. The usual first start writes both in one
        transaction: one revision, so a cluster booting at once costs every watcher one event per node, not two.
        Claims of other nodes made since we listed are older than ours and win: we check, and move on if so."""
        published: NodeRecord | None = None
        for ip in self._candidates(config.overlay_cidr, taken):
            record = self._record(config, ip)
            claim_key = self._schema.claim(self._name, str(ip))
            if published is None:
                holders = await self._store.create_all(
                    [(claim_key, b"", 0), (self._schema.node(self._name), encode_json(record.to_json()), lease_id)]
                )
                if holders is None:
                    published = record
                elif holders[0] is None:
                    # A record of ours is there already (a previous run whose claim is gone): claim alone, then
                    # take the record over.
                    await self._store.create(claim_key, b"")
            else:
                await self._store.create(claim_key, b"")
            holder = (await self._claims()).reservations.get(str(ip))
            if holder is None or holder.owner != self._name:
                log.info(
                    "%s claimed %s first; %s tries the next address",
                    holder.owner if holder else "nobody",
                    ip,
                    self._name,
                )
                await self._store.delete(claim_key)
                continue
            log.info("claimed overlay address %s for %s", ip, self._name)
            if published is not None and published.overlay_ip == ip:
                return published
            return await self._publish(record, lease_id)
        raise AddressSpaceExhausted(
            f"every address in the mesh network {config.overlay_cidr} is claimed; widen overlayCIDR"
        )

    async def _publish(self, record: NodeRecord, lease_id: int) -> NodeRecord:
        """Write ``record`` on ``lease_id``, taking over a record of ours from a previous run without a gap."""
        key = self._schema.node(self._name)
        existing = await self._store.create(key, encode_json(record.to_json()), lease=lease_id)
        while existing is not None:
            self._check_ours(existing.value)
            # Our own record from before a restart, still on the old lease: move it to the new lease without
            # a gap (peers see an update, not a delete and re-add), then let the old lease go.
            existing_lease = existing.lease
            record = replace(record, published_at=time.time())
            existing = await self._store.replace(
                key, encode_json(record.to_json()), mod_revision=existing.mod_revision, lease=lease_id
            )
            if existing is None and existing_lease not in (0, lease_id):
                await self._store.revoke_lease(existing_lease)
        return record

    def _check_ours(self, raw: bytes) -> None:
        where = self._schema.node(self._name)
        try:
            theirs = NodeRecord.from_json(decode_json(raw), key_name=self._name)
        except RecordError as exc:
            raise RegistrationConflict(
                f"{where} holds a record this agent cannot read ({exc}); remove it with `etcdctl del {where}`"
            ) from None
        if theirs.public_key != self._key.public_key:
            raise RegistrationConflict(
                f"node name {self._name!r} is registered with another public key ({theirs.public_key[:10]}…). "
                "If this node's key file was replaced, the old record expires with its lease shortly; "
                "otherwise give this node another --node-name."
            )

    async def republish(self, config: MeshConfig) -> None:
        """Publish again on the same lease when the mesh config changed what our record says (listen port)."""
        current = self.current
        if current is None:
            return
        record = self._record(config, current.record.overlay_ip)
        if (record.listen_port, record.endpoint) == (current.record.listen_port, current.record.endpoint):
            return
        value = encode_json(record.to_json())
        await self._store.put(self._schema.node(self._name), value, lease=current.lease_id)
        self.current = replace(current, record=record)
        self._published = value
        log.info("republished %s with listen port %d", self._name, record.listen_port)

    async def restore(self, value: bytes | None) -> None:
        """Publish our record again if someone else changed or deleted it while our lease is alive."""
        current = self.current
        if current is None or value == self._published:
            return
        log.warning(
            "the record of %s was %s by someone else; publishing it again",
            self._name,
            "deleted" if value is None else "changed",
        )
        try:
            await self._store.put(self._schema.node(self._name), self._published, lease=current.lease_id)
        except StoreError as exc:
            # Most likely our lease is gone (that deleted the record); the keepalive registers us again.
            log.warning("could not restore the record of %s: %s", self._name, exc)

    @property
    def reservation_key(self) -> str | None:
        """The key of our claim on the address we hold, once registered."""
        current = self.current
        return None if current is None else self._schema.claim(self._name, str(current.record.overlay_ip))

    async def restore_reservation(self, value: bytes | None) -> None:
        """Claim our address again if someone deleted our claim. Every agent keeps our record as long as it is
        older than a newer claim, but a node that claims the address as well would win it: the address is ours as
        long as we live, so we say so again at once. (What a claim's key holds is all it says: its value is
        ignored.)"""
        key = self.reservation_key
        if key is None or value is not None:
            return
        log.warning("the claim %s of %s was deleted by someone else; claiming again", key, self._name)
        try:
            await self._store.create(key, b"")
        except StoreError as exc:
            log.warning("could not claim %s again (retried with the next change): %s", key, exc)

    async def _hold(self, lease_id: int, ttl: int) -> None:
        """Refresh a lease every TTL/3 until etcd says it is gone; stream failures are retried, never fatal."""
        backoff = Backoff(initial=0.2, maximum=1.0)
        first_in = lease_refresh_interval(ttl)  # it was granted just now
        while True:
            try:
                await self._store.hold_lease(lease_id, ttl, first_in=first_in, on_renewed=backoff.reset)
                return
            except StoreError as exc:
                # Unreachable, stuck, or refused: all are retried (an agent that stops renewing leaves the mesh).
                self._metrics.lease_keepalive_failures.inc()
                log.warning("lease keepalive failed: %s", exc)
                # Renew as soon as a stream is back rather than in TTL/3: every second unrenewed is a second off
                # our peers' patience.
                first_in = 0.0
                await asyncio.sleep(backoff.delay())

    async def keep_alive(self, config: Callable[[], MeshConfig]) -> None:
        """Forever: wait until etcd drops our lease (refreshed from the moment it was granted), then register
        again with the current config, retrying until that succeeds (one lost lease is counted and said once)."""
        backoff = Backoff(initial=0.2, maximum=1.0)
        while True:
            current = self._registration()
            assert self._holder is not None
            # Shielded: this task being cancelled (the agent stopping) must not stop the refreshes before
            # deregister() revokes the lease; deregister (or the next registration) ends the holder.
            await asyncio.shield(self._holder)
            self._metrics.lease_keepalive_failures.inc()
            log.warning(
                "lease %x of %s is gone (etcd away for longer than %d s?); registering again",
                current.lease_id,
                self._name,
                current.ttl,
            )
            backoff.reset()
            while True:
                try:
                    await self.register(config(), current.record.overlay_ip)
                    break
                except StoreError as exc:
                    delay = backoff.delay()
                    log.warning("registering again failed (next try in %.1f s): %s", delay, exc)
                    await asyncio.sleep(delay)

    def _registration(self) -> Registration:
        if self.current is None:
            raise RuntimeError("the registrar has no registration (register() first)")
        return self.current

    async def deregister(self) -> None:
        """Revoke our lease so every peer drops us now rather than when it would expire."""
        current, self.current = self.current, None
        if self._holder is not None:
            self._holder.cancel()
            self._holder = None
        if current is not None:
            await self._revoke_quietly(current.lease_id)
            log.info("revoked lease of %s; peers drop it now", self._name)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._store.revoke_lease(lease_id)
        except StoreUnavailable as exc:
            log.warning("could not revoke lease %x (%s); it expires on its own", lease_id, exc)
