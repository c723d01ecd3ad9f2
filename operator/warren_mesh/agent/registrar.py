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
from dataclasses import dataclass, field, replace

from warren_mesh.admission import usable_host_range
from warren_mesh.keys import NodeKey
from warren_mesh.mesh.peers import MeshView
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.model import MeshConfig, NodeRecord, encode_json
from warren_mesh.netaddr import IPAddress, IPNetwork, parse_ip
from warren_mesh.schema import ClaimKind, KeySchema
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.base import Backoff, LeaseNotFound, Store, StoreError, StoreUnavailable, lease_refresh_interval
from warren_mesh.validation import Endpoint, RecordError, decode_json
from warren_mesh.watch import Snapshot

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Holdings:
    address: IPAddress | None = None
    subnet: IPNetwork | None = None
    taken_addresses: set[int] = field(default_factory=set)
    taken_subnets: set[str] = field(default_factory=set)


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
        self._next_key: str | None = None  # announced during a key rotation
        # Behind NAT: the endpoint peers see us at, learnt from their observations (None: endpoint_host's).
        self.public_endpoint: Endpoint | None = None
        self._observed: tuple[tuple[str, Endpoint], ...] = ()  # peers we see elsewhere than their records say
        self._endpoint_host = endpoint_host
        self._endpoint_pinned = settings.endpoint_host is not None  # --endpoint: never another
        self._endpoint_port = settings.endpoint_port  # None: follow the mesh's listen port
        self._lease_ttl = settings.lease_ttl  # None: the mesh config's
        self._pod_subnet = settings.pod_subnet  # None: claim one TTL
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

    async def _holdings(self, config: MeshConfig) -> _Holdings:
        """What we hold (an overlay address in the mesh network, a pod subnet of the mesh's size in the pod
        network) and what others hold. Our claims that lost to an older one are withdrawn; an address we hold only
        through a reservation of the old schema gets a claim of ours (so a migrated mesh keeps every address)."""
        view = await self._claims()
        holdings = _Holdings()
        for subject, holder in view.reservations.items():
            subnet = "/" in subject
            if holder.owner != self._name:
                (
                    holdings.taken_subnets.add(subject)
                    if subnet
                    else holdings.taken_addresses.add(int(parse_ip(subject)))
                )
                own = self._schema.claim(self._name, subject, "pods" if subnet else "overlay")
                if any(claim.key == own for claim in view.claims_on(subject)):
                    log.warning("withdrawing the claim of %s on %s: %s holds it", self._name, subject, holder.owner)
                    await self._store.delete(own)
            elif subnet:
                network = ipaddress.ip_network(subject)
                lower = holdings.subnet is None or int(network.network_address) < int(holdings.subnet.network_address)
                if config.is_node_subnet(network) and lower:
                    holdings.subnet = network
            else:
                ip = parse_ip(subject)
                if ip in config.overlay_cidr and (holdings.address is None or int(ip) < int(holdings.address)):
                    holdings.address = ip
        if holdings.address is not None:
            await self._store.create(self._schema.claim(self._name, str(holdings.address)), b"")  # no-op if there
        return holdings

    def _start(self, count: int) -> int:
        # Start where the name hashes to: nodes joining at once rarely race for the same address or subnet, and a
        # node whose claims were lost tends to get its old ones back.
        return int.from_bytes(hashlib.sha256(self._name.encode()).digest()[:8], "big") % count

    def _candidates(self, cidr: IPNetwork, taken: set[int]) -> Iterator[IPAddress]:
        first, last = usable_host_range(cidr)
        size = last - first + 1
        start = self._start(size)
        for step in range(size):
            candidate = first + (start + step) % size
            if candidate not in taken:
                yield ipaddress.ip_address(candidate)

    def _subnet_candidates(self, config: MeshConfig, taken: set[str]) -> Iterator[IPNetwork]:
        pods, prefix = config.pod_cidr, config.node_subnet_prefix
        count, size = config.node_subnets(), 1 << (pods.max_prefixlen - prefix)
        start = self._start(count)
        for step in range(count):
            subnet = ipaddress.ip_network(f"{pods.network_address + (start + step) % count * size}/{prefix}")
            if str(subnet) not in taken:
                yield subnet

    def _pinned_subnet(self, config: MeshConfig, holdings: _Holdings) -> IPNetwork:
        """The subnet given by --pod-subnet, if this mesh can give it to us."""
        pinned = self._pod_subnet
        assert pinned is not None
        if not config.is_node_subnet(pinned):
            raise RegistrationConflict(
                f"--pod-subnet {pinned} is not a /{config.node_subnet_prefix} of the pod network {config.pod_cidr}"
            )
        if str(pinned) in holdings.taken_subnets:
            raise RegistrationConflict(f"--pod-subnet {pinned} is claimed by another node")
        return pinned

    # --- registration -----------------------------------------------------------------------------------------

    def _record(self, config: MeshConfig, overlay_ip: IPAddress, subnet: IPNetwork | None) -> NodeRecord:
        port = config.listen_port if self._endpoint_port is None else self._endpoint_port
        return NodeRecord(
            name=self._name,
            public_key=self._key.public_key,
            endpoint=self.public_endpoint or Endpoint(self._endpoint_host, port),
            overlay_ip=overlay_ip,
            listen_port=config.listen_port,
            allowed_ips=() if subnet is None else (subnet,),
            published_at=time.time(),
            next_public_key=self._next_key,
            observed_endpoints=self._observed,
        )

    async def register(self, config: MeshConfig, held: NodeRecord | None = None) -> Registration:
        """Publish our record on a fresh lease: with the address and pod subnet of ``held`` (our record before
        the lease was lost), or else those we hold, claiming them the first time (stable across restarts); take
        over a record of ours left by a previous run."""
        ttl = self._lease_ttl if self._lease_ttl is not None else config.lease_ttl_seconds
        holdings = None
        if held is None:
            holdings = await self._holdings(config)
            if self._pod_subnet is not None:
                holdings.subnet = self._pinned_subnet(config, holdings)
        lease_id = await self._store.grant_lease(ttl)
        # Held from this moment, not from when the record is written: with a thousand nodes starting at once,
        # registering took several seconds, and a lease refreshed only after that expired before its first refresh.
        holder = asyncio.get_running_loop().create_task(self._hold(lease_id, ttl), name=f"lease-{lease_id:x}")
        # Records are stamped after the lease grant: published_at is when the record is written, so measured
        # convergence lag is the mesh's reaction time, not our own registration round trips.
        key = self._schema.node(self._name)
        try:
            if holdings is not None:
                record = await self._claim_and_publish(config, holdings, lease_id)
            else:
                assert held is not None
                subnet = held.allowed_ips[0] if held.allowed_ips else None
                record = await self._publish(self._record(config, held.overlay_ip, subnet), lease_id)
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
            "registered %s as %s, pods %s, at %s (lease %x, ttl %d s)",
            self._name,
            record.overlay_ip,
            ", ".join(str(n) for n in record.allowed_ips) or "none",
            record.endpoint,
            lease_id,
            ttl,
        )
        return self.current

    async def _claim_and_publish(self, config: MeshConfig, holdings: _Holdings, lease_id: int) -> NodeRecord:
        """Claim a free address and pod subnet (unless held already) and publish our record with them. The usual
        first start writes the claims and the record in one transaction: one revision, so a cluster booting at
        once costs every watcher one event per node. Claims of other nodes made since we listed are older than
        ours and win: we check, and move on to the next candidate if so."""
        addresses = self._candidates(config.overlay_cidr, holdings.taken_addresses)
        subnets = self._subnet_candidates(config, holdings.taken_subnets)
        ip = holdings.address or next(addresses, None)
        subnet = holdings.subnet or next(subnets, None)
        published: NodeRecord | None = None
        while True:
            if ip is None:
                raise AddressSpaceExhausted(
                    f"every address in the mesh network {config.overlay_cidr} is claimed; widen overlayCIDR"
                )
            record = self._record(config, ip, subnet)
            claims = [(self._schema.claim(self._name, str(ip)), b"", 0)]
            if subnet is not None:
                claims.append((self._schema.claim(self._name, str(subnet), "pods"), b"", 0))
            if published is None:
                node = (self._schema.node(self._name), encode_json(record.to_json()), lease_id)
                if await self._store.create_all([*claims, node]) is None:
                    published = record
            if published is not record:
                # Claims of ours may be there (held already, or a previous try), or a record of a previous run
                # whose claims are gone: claim each on its own, then take the record over.
                for key, value, _ in claims:
                    await self._store.create(key, value)
            holders = (await self._claims()).reservations
            lost = False
            claimed: list[tuple[str | None, ClaimKind]] = [
                (str(ip), "overlay"),
                (str(subnet) if subnet else None, "pods"),
            ]
            for subject, kind in claimed:
                if subject is None:
                    continue
                holder = holders.get(subject)
                if holder is None or holder.owner != self._name:
                    lost = True
                    log.info(
                        "%s claimed %s first; %s tries the next", holder.owner if holder else "?", subject, self._name
                    )
                    await self._store.delete(self._schema.claim(self._name, subject, kind))
                    if kind == "overlay":
                        ip = next(addresses, None)
                    elif self._pod_subnet is not None:
                        raise RegistrationConflict(
                            f"--pod-subnet {subnet} is claimed by {holder.owner if holder else '?'}"
                        )
                    else:
                        subnet = next(subnets, None)
            if not lost:
                break
        if subnet is None:
            self._metrics.pod_subnet_missing.set(1)
            log.error(
                "no pod subnet for %s: every /%d of the pod network %s is claimed (%d); pods on this node get no "
                "network until one is freed or podCIDR is widened",
                self._name,
                config.node_subnet_prefix,
                config.pod_cidr,
                config.node_subnets(),
            )
        else:
            self._metrics.pod_subnet_missing.set(0)
        log.info("claimed overlay address %s and pod subnet %s for %s", ip, subnet, self._name)
        if published is not None and (published.overlay_ip, published.allowed_ips) == (
            record.overlay_ip,
            record.allowed_ips,
        ):
            return published
        return await self._publish(record, lease_id)

    async def _publish(self, record: NodeRecord, lease_id: int) -> NodeRecord:
        """Write ``record`` on ``lease_id``, taking over a record of ours from a previous run without a gap."""
        key = self._schema.node(self._name)
        existing = await self._store.create(key, encode_json(record.to_json()), lease=lease_id)
        while existing is not None:
            previous = self._check_ours(existing.value)
            if not self._endpoint_pinned and previous.endpoint != record.endpoint and self.public_endpoint is None:
                # Our record says where peers reach us, learnt before a restart (behind NAT): the address this run
                # found would send them to a private one until they told us again (docs/nat.md).
                self.public_endpoint = previous.endpoint
                record = replace(record, endpoint=previous.endpoint)
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

    def _check_ours(self, raw: bytes) -> NodeRecord:
        where = self._schema.node(self._name)
        try:
            theirs = NodeRecord.from_json(decode_json(raw), key_name=self._name)
        except RecordError as exc:
            raise RegistrationConflict(
                f"{where} holds a record this agent cannot read ({exc}); remove it with `etcdctl del {where}`"
            ) from None
        # Ours also when it names our key as the next one: a run that stopped in the middle of a key rotation.
        if self._key.public_key not in theirs.public_keys:
            raise RegistrationConflict(
                f"node name {self._name!r} is registered with another public key ({theirs.public_key[:10]}…). "
                "If this node's key file was replaced, the old record expires with its lease shortly; "
                "otherwise give this node another --node-name."
            )
        return theirs

    async def republish(self, config: MeshConfig) -> None:
        """Publish again on the same lease when the mesh config changed what our record says (listen port)."""
        current = self.current
        if current is None:
            return
        subnet = current.record.allowed_ips[0] if current.record.allowed_ips else None
        record = self._record(config, current.record.overlay_ip, subnet)
        if (record.listen_port, record.endpoint) == (current.record.listen_port, current.record.endpoint):
            return
        await self._put_current(record, f"republished with listen port {record.listen_port}")

    async def announce_key(self, public_key: str) -> None:
        """Tell peers the key we switch to next (key rotation): they add it before we use it."""
        self._next_key = public_key
        await self._publish_current("announced the next key")

    def withdraw_announcement(self) -> None:
        """A rotation that did not happen: our next record announces nothing."""
        self._next_key = None

    async def switch_key(self, key: NodeKey) -> None:
        """We use ``key`` now (the device has it): publish it as our key, the announcement done."""
        self._key, self._next_key = key, None
        await self._publish_current("switched to the new key")

    async def _publish_current(self, what: str) -> None:
        current = self.current
        if current is None:
            return  # between leases, or stopping: the next registration publishes all of it
        await self._put_current(self._record_like(current.record), what)

    async def _put_current(self, record: NodeRecord, what: str) -> None:
        """Write ``record`` as ours on the lease we hold now."""
        current = self.current
        assert current is not None  # callers return early between leases
        value = encode_json(record.to_json())
        await self._store.put(self._schema.node(self._name), value, lease=current.lease_id)
        self.current = replace(current, record=record)
        self._published = value
        log.info("%s: %s (key %s…)", self._name, what, record.public_key[:10])

    async def set_observed(self, observed: tuple[tuple[str, Endpoint], ...]) -> None:
        """Publish where we see peers whose packets come from elsewhere than their records say (docs/nat.md)."""
        if observed != self._observed:
            self._observed = observed
            await self._publish_current(f"observed {len(observed)} peer(s) elsewhere than their records say")

    async def set_public_endpoint(self, endpoint: Endpoint) -> None:
        """Peers see us at ``endpoint`` (we are behind NAT): publish it as ours."""
        if endpoint != self.public_endpoint:
            self.public_endpoint = endpoint
            await self._publish_current(f"peers see this node at {endpoint}: publishing that endpoint")

    def _record_like(self, record: NodeRecord) -> NodeRecord:
        """``record`` with our current key, announcement, endpoint, observations and time."""
        return replace(
            record,
            public_key=self._key.public_key,
            next_public_key=self._next_key,
            endpoint=self.public_endpoint or record.endpoint,
            observed_endpoints=self._observed,
            published_at=time.time(),
        )

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
    def reservation_keys(self) -> tuple[str, ...]:
        """The keys of our claims (our address, our pod subnet), once registered."""
        current = self.current
        if current is None:
            return ()
        record = current.record
        subnets = tuple(self._schema.claim(self._name, str(n), "pods") for n in record.allowed_ips)
        return (self._schema.claim(self._name, str(record.overlay_ip)), *subnets)

    async def restore_reservation(self, key: str, value: bytes | None) -> None:
        """Claim again what is ours if someone deleted our claim ``key``. Every agent keeps our record as long as it
        is older than a newer claim, but a node that claims the same as well would win it: it is ours as long as we
        live, so we say so again at once. (What a claim's key holds is all it says: its value is ignored.)"""
        if key not in self.reservation_keys or value is not None:
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
                    await self.register(config(), current.record)
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

    async def hand_over(self, grace: int) -> None:
        """Leave our record to the agent that replaces this one: it moves onto a lease of ``grace`` seconds that
        nobody renews, so peers keep this node (and its traffic flows) while the next run starts, which takes the
        record over without a gap (``_publish``). If no run comes, the record expires after ``grace`` s."""
        current, self.current = self.current, None
        if self._holder is not None:
            self._holder.cancel()
            self._holder = None
        if current is None:
            return
        key = self._schema.node(self._name)
        lease_id = await self._store.grant_lease(grace)
        existing = await self._store.get(key)
        conflict = existing
        if existing is not None and existing.lease == current.lease_id:
            conflict = await self._store.replace(
                key, existing.value, mod_revision=existing.mod_revision, lease=lease_id
            )
        if conflict is None:
            log.info("%s stays in the mesh for %d s for the agent that replaces this one", self._name, grace)
        else:  # not ours to hand over any more (taken over, or gone): leave as deregister would
            await self._revoke_quietly(lease_id)
        await self._revoke_quietly(current.lease_id)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._store.revoke_lease(lease_id)
        except StoreUnavailable as exc:
            log.warning("could not revoke lease %x (%s); it expires on its own", lease_id, exc)
