"""This node's place in the mesh, and the one writer of this node's keys in etcd: its claims, its record (with
what it observes and the key it rotates to), and the lease the record lives on.

The address is claimed under ``claims/<node>/overlay/<address>``, a key only this node may write (with etcd's
auth on, docs/security.md). Two nodes may claim one address; the older claim (lower create revision) holds it,
the same on every node, and the younger claimant sees that right after it wrote its claim and moves on
(mesh/allocation.py decides; this module writes). Claims never expire, so a node gets the same address after any
restart. Liveness is separate: the node record sits on a short lease (lease.py); if we die, etcd deletes the
record when the lease runs out and every peer drops us. What the record says and how it is kept so:
publication.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from warren_mesh.agent.identity import Identity
from warren_mesh.agent.lease import LeaseKeeper
from warren_mesh.agent.observer import Observed
from warren_mesh.agent.publication import RecordPublisher, Registration
from warren_mesh.mesh import allocation
from warren_mesh.mesh.allocation import AddressSpaceExhausted, Holdings, RegistrationConflict
from warren_mesh.mesh.view import MeshView
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.base import Backoff, LeaseNotFound, Store, StoreError, StoreUnavailable
from warren_mesh.trust.records import MeshConfig, NodeRecord, encode_json
from warren_mesh.values.keyspace import ClaimKind, KeySchema
from warren_mesh.values.netaddr import IPAddress, IPNetwork
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot

log = logging.getLogger(__name__)

# Nodes that claimed since our listing whose claims are read (together) to check ours; more: all are listed again.
_CLAIMANTS_READ_APART = 32


def _gone(key: str) -> Event:
    return Event("delete", KeyValue(key, b"", 0, 0))


@dataclass(slots=True)
class _Want:
    """One claim a registration needs: an address of an overlay network, or a subnet of a pod network."""

    kind: ClaimKind
    network: IPNetwork  # the overlay or pod network
    candidates: Iterator[IPAddress | IPNetwork]  # free ones, in this node's order
    choice: IPAddress | IPNetwork | None  # the one held or tried now (None: none left)
    pinned: bool = False  # --pod-subnet: no other will do
    node_prefix: int = 0  # of a pod network


class Registrar:
    def __init__(
        self,
        settings: RegistrationSettings,
        *,
        store: Store,
        schema: KeySchema,
        identity: Identity,
        endpoint_hosts: tuple[IPAddress, ...],
        metrics: AgentMetrics,
    ) -> None:
        """``endpoint_hosts``: the settings' endpoint addresses, or those found on this host when they name none."""
        self._store = store
        self._schema = schema
        self._name = settings.node_name
        self._lease_ttl = settings.lease_ttl  # None: the mesh config's
        self._pod_subnet = settings.pod_subnet  # None: claim one
        self._metrics = metrics
        self.publication = RecordPublisher(
            settings, store=store, schema=schema, identity=identity, endpoint_hosts=endpoint_hosts
        )
        self._leases = LeaseKeeper(store, metrics)
        self._config: MeshConfig | None = None  # the config our record was last written for
        self._removing: set[str] = set()  # surplus claims of ours deleted, not yet seen gone

    @property
    def current(self) -> Registration | None:
        return self.publication.current

    @property
    def watched_keys(self) -> tuple[str, ...]:
        """The keys whose every change this node must hear about: its record and its claims."""
        return (self.publication.key, *self.publication.claim_keys, self._schema.location(self._name))

    # --- claims -----------------------------------------------------------------------------------------------

    async def _claims(self, listed: Snapshot | None = None) -> MeshView:
        """Every claim on an overlay address, judged as every agent judges them (including the ``ipam/``
        reservations of a mesh not migrated yet): as ``listed`` (the whole mesh, listed by the caller) has them,
        or listed now."""
        schema = self._schema
        view = MeshView(schema)
        if listed is not None:
            kinds = (schema.claims, schema.ipam)
            view.apply(Snapshot(tuple(kv for kv in listed.items if kv.key.startswith(kinds)), listed.revision))
            return view
        claims, legacy = await asyncio.gather(
            self._store.list_prefix(schema.claims), self._store.list_prefix(schema.ipam)
        )
        # At the older of the two listings' revisions: what was made since then is what _claims_since asks for.
        view.apply(Snapshot(claims.items + legacy.items, min(claims.revision, legacy.revision)))
        return view

    async def _claims_since(self, view: MeshView) -> MeshView:
        """``view`` brought up to date for judging our claims: what a claim of ours can lose to is older than it,
        so in ``view`` already or made since. A node that claimed since may also have withdrawn claims (which,
        left in ``view``, would still count as what it holds of their kind and make its new one surplus): its
        claims are read again whole. Listing every claim again instead was a fifth of an agent's cold start
        beside 10,000 nodes; with many nodes claiming at once (a cold boot) it is still the cheaper way."""
        made = await self._store.list_prefix(self._schema.claims, created_after=view.revision)
        legacy = await self._store.list_prefix(self._schema.ipam, created_after=view.revision)
        schema = self._schema
        claimants = sorted({claim.node for kv in made.items if (claim := schema.claim_key(kv.key)) is not None})
        if len(claimants) > _CLAIMANTS_READ_APART:
            return await self._claims()
        events: list[Event] = []
        listings = await asyncio.gather(*(self._store.list_prefix(schema.claims_of(node)) for node in claimants))
        for node, current in zip(claimants, listings, strict=True):
            present = {kv.key for kv in current.items}
            events.extend(_gone(key) for key in view.claim_keys_of(node) if key not in present)
            events.extend(Event("put", kv) for kv in sorted(current.items, key=lambda kv: kv.create_revision))
        events.extend(Event("put", kv) for kv in sorted(legacy.items, key=lambda kv: kv.create_revision))
        view.apply(Events(tuple(events), min(made.revision, legacy.revision)))
        return view

    async def _withdraw(self, view: MeshView, key: str) -> None:
        """Delete a claim of ours, in etcd and in ``view`` (kept there, an older claim of ours that lost its
        subject would still count as what we hold of its kind, and every new one as surplus)."""
        await self._store.delete(key)
        view.apply(Events((_gone(key),), view.revision))

    async def _holdings(self, config: MeshConfig, listed: Snapshot | None = None) -> tuple[Holdings, MeshView]:
        """What we hold and what others hold, and the claims we judged it by (``listed``: see ``_claims``). Our
        claims that lost to an older one are withdrawn; an address we hold only through a reservation of the old
        schema gets a claim of ours (so a migrated mesh keeps every address)."""
        view = await self._claims(listed)
        found = allocation.holdings(view, config, self._name, self._schema)
        for key, why in found.withdraw.items():
            log.warning("withdrawing the claim %s of %s: %s", key, self._name, why)
            await self._withdraw(view, key)
        for address in found.addresses.values():
            await self._store.create(self._schema.claim(self._name, str(address)), b"")  # no-op if there
        return found, view

    # --- registration -----------------------------------------------------------------------------------------

    async def register(
        self, config: MeshConfig, held: NodeRecord | None = None, *, listed: Snapshot | None = None
    ) -> Registration:
        """Publish our record on a fresh lease: with the address and pod subnet of ``held`` (our record before
        the lease was lost), or else those we hold, claiming them the first time (stable across restarts); take
        over a record of ours left by a previous run. ``listed``: the whole mesh as the caller listed it (at a
        cold start beside thousands of nodes, listing their claims again here was a twentieth of the start); the
        claims made since are read before ours are trusted, as always."""
        ttl = self._lease_ttl if self._lease_ttl is not None else config.lease_ttl_seconds
        await self.publication.read_location()
        found = None
        if held is None:
            found, claims = await self._holdings(config, listed)
            if self._pod_subnet is not None:
                found.subnets[self._pod_subnet.version] = allocation.pinned_subnet(self._pod_subnet, config, found)
        lease_id, holder = await self._leases.grant(ttl)
        # Records are stamped after the lease grant: published_at is when the record is written, so measured
        # convergence lag is the mesh's reaction time, not our own registration round trips.
        try:
            if found is not None:
                record = await self._claim_and_publish(config, found, claims, lease_id)
            else:
                assert held is not None
                record = await self.publication.publish(
                    self.publication.record(config, held.overlay_ips, held.allowed_ips), lease_id
                )
        except LeaseNotFound:
            # The new lease ran out before the record was written: etcd or this agent stalled for longer than the
            # TTL. Nothing is wrong with the registration itself, so callers retry it like an unreachable etcd.
            holder.cancel()
            raise StoreUnavailable(
                f"lease {lease_id:x} expired before {self.publication.key} was written; registering again"
            ) from None
        except BaseException:
            holder.cancel()
            await asyncio.shield(self._leases.revoke_quietly(lease_id))
            raise
        self._leases.adopt(holder)
        registration = Registration(record, lease_id, ttl)
        self.publication.registered(registration)
        self._config = config
        self._metrics.registrations.inc()
        log.info(
            "registered %s as %s, pods %s, at %s (lease %x, ttl %d s)",
            self._name,
            ", ".join(record.overlay_texts),
            ", ".join(str(n) for n in record.allowed_ips) or "none",
            ", ".join(record.endpoint_texts),
            lease_id,
            ttl,
        )
        return registration

    async def _claim_and_publish(
        self, config: MeshConfig, found: Holdings, claims: MeshView, lease_id: int
    ) -> NodeRecord:
        """Claim a free address in each overlay network and a subnet of each pod network (unless held already)
        and publish our record with them. The usual first start writes the claims and the record in one
        transaction: one revision, so a cluster booting at once costs every watcher one event per node. Claims of
        other nodes made since we listed are older than ours and win: we check, and move on to the next candidate
        if so."""
        wants = self._wants(config, found)
        published: NodeRecord | None = None
        while True:
            for want in wants:
                if want.kind == "overlay" and want.choice is None:
                    raise AddressSpaceExhausted(
                        f"every address in the mesh network {want.network} is claimed; widen overlayCIDR (overlayCIDRs)"
                    )
            ips = tuple(w.choice for w in wants if isinstance(w.choice, IPv4Address | IPv6Address))
            subnets = tuple(w.choice for w in wants if isinstance(w.choice, IPv4Network | IPv6Network))
            record = self.publication.record(config, ips, subnets)
            writes = [
                (self._schema.claim(self._name, str(w.choice), w.kind), b"", 0) for w in wants if w.choice is not None
            ]
            if published is None:
                node = (self.publication.key, encode_json(record.to_json()), lease_id)
                if await self._store.create_all([*writes, node]) is None:
                    published = record
            if published is not record:
                # Claims of ours may be there (held already, or a previous try), or a record of a previous run
                # whose claims are gone: claim each on its own, then take the record over.
                for key, value, _ in writes:
                    await self._store.create(key, value)
            claims = await self._claims_since(claims)
            holders = claims.reservations
            lost = False
            for want in wants:
                if want.choice is None:
                    continue
                subject = str(want.choice)
                holder = holders.get(subject)
                if holder is not None and holder.owner == self._name:
                    continue
                lost = True
                log.info("%s claimed %s first; %s tries the next", holder.owner if holder else "?", subject, self._name)
                await self._withdraw(claims, self._schema.claim(self._name, subject, want.kind))
                if want.pinned:
                    raise RegistrationConflict(
                        f"--pod-subnet {subject} is claimed by {holder.owner if holder else '?'}"
                    )
                want.choice = next(want.candidates, None)
            if not lost:
                break
        for want in wants:
            if want.kind == "pods":
                self._say_subnet(want)
        log.info(
            "claimed overlay address %s and pod subnet %s for %s",
            ", ".join(map(str, ips)),
            ", ".join(map(str, subnets)) or "none",
            self._name,
        )
        if published is not None and (published.overlay_ips, published.allowed_ips) == (
            record.overlay_ips,
            record.allowed_ips,
        ):
            return published
        return await self.publication.publish(record, lease_id)

    def _wants(self, config: MeshConfig, found: Holdings) -> list[_Want]:
        """What to hold: an address of each overlay network and a subnet of each pod network, each the one held
        already or else the first free candidate."""
        wants = []
        for overlay in config.overlay_cidrs:
            version = overlay.version
            candidates: Iterator[IPAddress | IPNetwork] = allocation.address_candidates(
                self._name, overlay, found.taken_addresses[version]
            )
            held = found.addresses.get(version)
            wants.append(_Want("overlay", overlay, candidates, held or next(candidates, None)))
        for pods in config.pod_networks:
            candidates = allocation.subnet_candidates(self._name, pods, found.taken_subnets)
            pinned = self._pod_subnet is not None and self._pod_subnet.version == pods.version
            subnet = found.subnets.get(pods.version)
            wants.append(
                _Want("pods", pods.cidr, candidates, subnet or next(candidates, None), pinned, pods.node_prefix)
            )
        return wants

    def _say_subnet(self, want: _Want) -> None:
        if want.choice is not None:
            self._metrics.pod_subnet_missing.labels(f"ipv{want.network.version}").set(0)
            return
        self._metrics.pod_subnet_missing.labels(f"ipv{want.network.version}").set(1)
        log.error(
            "no pod subnet for %s: every /%d of the pod network %s is claimed; pods on this node get no IPv%d "
            "network until one is freed or the pod network is widened",
            self._name,
            want.node_prefix,
            want.network,
            want.network.version,
        )

    # --- keeping it so ----------------------------------------------------------------------------------------

    async def follow(self, observed: Observed) -> None:
        """What the watch said about our keys: our record or claims changed or deleted by someone else are written
        back at once; a config change that alters what our record says is published again."""
        publication = self.publication
        for key, value in observed.mentioned.items():
            if key == publication.key:
                await publication.restore(value, observed.revisions.get(key))
            elif key == self._schema.location(self._name):
                await publication.set_location(value)
            else:
                await publication.restore_claim(key, value)
        await self._remove_surplus(observed.surplus)
        config = observed.config
        if self._config is None or config is self._config:
            return  # the view hands on the same config object until it changes: most batches end here
        if config == self._config:
            self._config = config
            return
        try:
            if self._lacks_family(config):
                await self._extend(config)
            else:
                await publication.republish(config)
            self._config = config
        except StoreUnavailable as exc:
            log.warning("could not republish after a config change (retried with the next event): %s", exc)

    def _lacks_family(self, config: MeshConfig) -> bool:
        """Whether the mesh has a network of a family our record has nothing of (it just became dual-stack)."""
        current = self.current
        if current is None:
            return False
        record = current.record
        have = {ip.version for ip in record.overlay_ips}
        subnets = {n.version for n in record.allowed_ips}
        return any(v not in have for v in config.families) or any(p.version not in subnets for p in config.pod_networks)

    async def _extend(self, config: MeshConfig) -> None:
        """Claim an address and a pod subnet in the networks of the family the mesh gained, keeping those we hold,
        and publish them on the lease we hold (peers update the record; nothing of the first family changes)."""
        current = self._registration()
        found, claims = await self._holdings(config)
        if self._pod_subnet is not None:
            found.subnets[self._pod_subnet.version] = allocation.pinned_subnet(self._pod_subnet, config, found)
        record = await self._claim_and_publish(config, found, claims, current.lease_id)
        self.publication.registered(Registration(record, current.lease_id, current.ttl))
        log.info(
            "%s holds %s and pods %s in the mesh's networks now",
            self._name,
            ", ".join(record.overlay_texts),
            ", ".join(str(n) for n in record.allowed_ips) or "none",
        )

    async def _remove_surplus(self, surplus: tuple[str, ...]) -> None:
        """Claims of ours that take nothing (we hold an older one of their kind): someone with our credential
        wrote them. Each is removed once; the next batch says whether it is gone."""
        for key in surplus:
            if key in self._removing:
                continue
            log.warning(
                "removing %s: a claim of %s that takes nothing (it holds an older one of its kind)", key, self._name
            )
            self._metrics.surplus_claims_removed.inc()
            try:
                await self._store.delete(key)
            except StoreUnavailable as exc:
                log.warning("could not remove %s (tried again with the next batch): %s", key, exc)
                continue
            self._removing.add(key)
        self._removing &= set(surplus)

    async def keep_alive(self, config: Callable[[], MeshConfig]) -> None:
        """Forever: wait until etcd drops our lease (refreshed from the moment it was granted), then register
        again with the current config, retrying until that succeeds (one lost lease is counted and said once)."""
        backoff = Backoff(initial=0.2, maximum=1.0)
        while True:
            current = self._registration()
            await self._leases.lost()
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
        current = self.publication.unregistered()
        self._leases.release()
        if current is not None:
            await self._leases.revoke_quietly(current.lease_id)
            log.info("revoked lease of %s; peers drop it now", self._name)

    async def hand_over(self, grace: int) -> None:
        """Leave our record to the agent that replaces this one (lease.py), which takes it over without a gap."""
        current = self.publication.unregistered()
        if current is None:
            self._leases.release()
            return
        await self._leases.hand_over(self.publication.key, current.lease_id, grace)  # releases the lease too
