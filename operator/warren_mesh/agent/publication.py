"""Publication: this node's record as it should read now, written on the lease it holds, and kept so.

The record says who we are (our key in use, and during a rotation the next one), where peers reach us (our
endpoint, or behind NAT the one peers see us at), what we hold (overlay address, pod subnet) and where we see
peers elsewhere than their records say. Whoever changes or deletes it or our claims while our lease is alive
gets them written back at once. A record for our name that carries another public key belongs to someone else
and is never overwritten.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from warren_mesh.agent.identity import Identity
from warren_mesh.mesh.allocation import RegistrationConflict
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.base import Store, StoreError
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.node_fields import validate_location
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import MeshConfig, NodeRecord, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.netaddr import IPAddress, IPNetwork, parse_ip

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Registration:
    record: NodeRecord
    lease_id: int
    ttl: int


class RecordPublisher:
    def __init__(
        self,
        settings: RegistrationSettings,
        *,
        store: Store,
        schema: KeySchema,
        identity: Identity,
        endpoint_hosts: tuple[IPAddress, ...],
    ) -> None:
        """``endpoint_hosts``: the settings' endpoint addresses, or those found on this host when they name none
        (one per underlay family, the preferred first)."""
        self._store = store
        self._schema = schema
        self._name = settings.node_name
        self._identity = identity
        self._next_key: str | None = None  # announced during a key rotation
        # Behind NAT: the endpoint peers see us at, learnt from their observations; it stands in for the endpoint of
        # its family (None: endpoint_hosts').
        self.public_endpoint: Endpoint | None = None
        self._observed: tuple[tuple[str, Endpoint], ...] = ()  # peers we see elsewhere than their records say
        self._endpoint_hosts = endpoint_hosts
        self._endpoint_pinned = bool(settings.endpoint_hosts)  # --endpoint: never another
        self._endpoint_port = settings.endpoint_port  # None: follow the mesh's listen port
        self._location = settings.location  # --location, else what the operator says (locations/<node>)
        self._location_pinned = settings.location is not None
        self._external_hosts = tuple(parse_ip(host) for host in settings.external_hosts)
        self._external_port = settings.external_port  # None: our endpoint's port
        self._unreachable: tuple[str, ...] = ()  # peers we should reach directly but cannot
        self.key = schema.node(self._name)  # where our record lives
        self.current: Registration | None = None
        self._claim_keys: tuple[str, ...] = ()  # of the current registration
        self._published = b""  # the exact value of our record in etcd, to notice when someone changes it
        self._published_revision = 0  # the revision we wrote it at (0: not known)
        # The value of a write of ours not answered yet: the watch may show it before etcd's answer reaches us.
        self._writing: bytes | None = None

    @property
    def name(self) -> str:
        return self._name

    def record(
        self, config: MeshConfig, overlay_ips: tuple[IPAddress, ...], subnets: tuple[IPNetwork, ...]
    ) -> NodeRecord:
        """Our record as it should read now, with ``overlay_ips`` and pod ``subnets``."""
        port = config.listen_port if self._endpoint_port is None else self._endpoint_port
        return NodeRecord(
            name=self._name,
            public_key=self._identity.public_key,
            endpoints=self._endpoints(tuple(Endpoint(host, port) for host in self._endpoint_hosts)),
            overlay_ips=overlay_ips,
            listen_port=config.listen_port,
            allowed_ips=subnets,
            published_at=time.time(),
            next_public_key=self._next_key,
            observed_endpoints=self._observed,
            location=self._location,
            external_endpoints=tuple(Endpoint(host, self._external_port or port) for host in self._external_hosts),
            unreachable=self._unreachable,
        )

    def _endpoints(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        """``endpoints`` with the one of the public endpoint's family replaced by it (behind NAT)."""
        public = self.public_endpoint
        if public is None:
            return endpoints
        if all(e.host.version != public.host.version for e in endpoints):
            return (public, *endpoints)
        return tuple(public if e.host.version == public.host.version else e for e in endpoints)

    def registered(self, registration: Registration) -> None:
        """``registration`` is in etcd now (on a fresh lease)."""
        self.current = registration
        self._published = encode_json(registration.record.to_json())
        self._published_revision = 0
        record = registration.record
        subnets = tuple(self._schema.claim(self._name, str(n), "pods") for n in record.allowed_ips)
        addresses = tuple(self._schema.claim(self._name, text) for text in record.overlay_texts)
        self._claim_keys = (*addresses, *subnets)

    def unregistered(self) -> Registration | None:
        """We leave (or are between leases): the registration we had."""
        current, self.current = self.current, None
        self._claim_keys = ()
        return current

    async def publish(self, record: NodeRecord, lease_id: int) -> NodeRecord:
        """Write ``record`` on ``lease_id``, taking over a record of ours from a previous run without a gap."""
        key = self.key
        existing = await self._store.create(key, encode_json(record.to_json()), lease=lease_id)
        while existing is not None:
            if existing.mod_revision == 0:
                # Gone since we looked (the previous run's lease ran out meanwhile: seen in a storm of 1,000
                # agents, where this used to end the agent as "a record this agent cannot read"): create it.
                existing = await self._store.create(key, encode_json(record.to_json()), lease=lease_id)
                continue
            previous = self._check_ours(existing.value)
            learnt = next((e for e in previous.endpoints if e not in record.endpoints), None)
            if not self._endpoint_pinned and learnt is not None and self.public_endpoint is None:
                # Our record says where peers reach us, learnt before a restart (behind NAT): the address this run
                # found would send them to a private one until they told us again (docs/nat.md).
                self.public_endpoint = learnt
                record = replace(record, endpoints=self._endpoints(record.endpoints))
            # Our own record from before a restart, still on the old lease: move it to the new lease without
            # a gap (peers see an update, not a delete and re-add), then let the old lease go.
            existing_lease = existing.lease
            record = replace(record, published_at=time.time())
            existing = await self._store.replace(
                key, encode_json(record.to_json()), mod_revision=existing.mod_revision, lease=lease_id
            )
            if existing is None and existing_lease not in (0, lease_id):
                await self._move_candidacies(existing_lease, lease_id)
                await self._store.revoke_lease(existing_lease)
        return record

    async def _move_candidacies(self, old_lease: int, lease_id: int) -> None:
        """Our gateway candidacy on the lease of a previous run goes onto ours first (a put keeps its create
        revision, so its place in line): an agent restarted in time stays its location's gateway."""
        found = await self._store.list_prefix(self._schema.candidacies_of(self._name))
        for kv in found.items:
            if kv.lease == old_lease:
                await self._store.put(kv.key, kv.value, lease=lease_id)

    def _check_ours(self, raw: bytes) -> NodeRecord:
        where = self.key
        try:
            theirs = NodeRecord.from_json(decode_json(raw), key_name=self._name)
        except RecordError as exc:
            raise RegistrationConflict(
                f"{where} holds a record this agent cannot read ({exc}); remove it with `etcdctl del {where}`"
            ) from None
        # Ours also when it names our key as the next one: a run that stopped in the middle of a key rotation.
        if self._identity.public_key not in theirs.public_keys:
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
        record = self.record(config, current.record.overlay_ips, current.record.allowed_ips)
        if (record.listen_port, record.endpoints) == (current.record.listen_port, current.record.endpoints):
            return
        await self._put_current(record, f"republished with listen port {record.listen_port}")

    async def announce_key(self, public_key: str) -> None:
        """Tell peers the key we switch to next (key rotation): they add it before we use it."""
        self._next_key = public_key
        await self._publish_current("announced the next key")

    def withdraw_announcement(self) -> None:
        """A rotation that did not happen: our next record announces nothing."""
        self._next_key = None

    async def publish_switched_key(self) -> None:
        """We use the identity's key now (the device has it): publish it as our key, the announcement done."""
        self._next_key = None
        await self._publish_current("switched to the new key")

    async def set_observed(self, observed: tuple[tuple[str, Endpoint], ...]) -> None:
        """Publish where we see peers whose packets come from elsewhere than their records say (docs/nat.md)."""
        if observed != self._observed:
            self._observed = observed
            await self._publish_current(f"observed {len(observed)} peer(s) elsewhere than their records say")

    @property
    def location(self) -> str | None:
        return self._location

    async def read_location(self) -> None:
        """Without --location: the location the operator says for this node (its Node's topology label), read
        before registering."""
        if not self._location_pinned:
            found = await self._store.get(self._schema.location(self._name))
            self._location = self._location_of(found.value if found is not None else None)

    async def set_location(self, value: bytes | None) -> None:
        """The operator's word on our location changed (``locations/<node>``; None: deleted): publish it, unless
        --location pins ours."""
        if self._location_pinned:
            return
        location = self._location_of(value)
        if location != self._location:
            self._location = location
            await self._publish_current(f"in location {location or '(none)'}")

    def _location_of(self, value: bytes | None) -> str | None:
        """A location as the operator wrote it; a value that is none is said and kept out (we keep ours)."""
        if not value:
            return None
        try:
            return validate_location(value.decode("ascii"))
        except (UnicodeDecodeError, RecordError) as exc:
            log.warning("%s is no location (%s); keeping %s", self._schema.location(self._name), exc, self._location)
            return self._location

    async def set_unreachable(self, names: tuple[str, ...]) -> None:
        """Publish the peers we should reach directly but cannot (docs/topology.md#relays)."""
        if names != self._unreachable:
            self._unreachable = names
            await self._publish_current(f"cannot reach {len(names)} peer(s) directly: {', '.join(names) or 'none'}")

    async def set_public_endpoint(self, endpoint: Endpoint) -> None:
        """Peers see us at ``endpoint`` (we are behind NAT): publish it as ours."""
        if endpoint != self.public_endpoint:
            self.public_endpoint = endpoint
            await self._publish_current(f"peers see this node at {endpoint}: publishing that endpoint")

    async def _publish_current(self, what: str) -> None:
        current = self.current
        if current is None:
            return  # between leases, or stopping: the next registration publishes all of it
        record = replace(
            current.record,
            public_key=self._identity.public_key,
            next_public_key=self._next_key,
            endpoints=self._endpoints(current.record.endpoints),
            observed_endpoints=self._observed,
            unreachable=self._unreachable,
            location=self._location,
            published_at=time.time(),
        )
        await self._put_current(record, what)

    async def _put_current(self, record: NodeRecord, what: str) -> None:
        """Write ``record`` as ours on the lease we hold now."""
        current = self.current
        assert current is not None  # callers return early between leases
        value = encode_json(record.to_json())
        self._writing = value
        try:
            revision = await self._store.put(self.key, value, lease=current.lease_id)
        finally:
            self._writing = None
        self.current = replace(current, record=record)
        self._published, self._published_revision = value, revision
        log.info("%s: %s (key %s…)", self._name, what, record.public_key[:10])

    async def restore(self, value: bytes | None, revision: int | None = None) -> None:
        """Publish our record again if someone else changed or deleted it while our lease is alive. ``revision``:
        the revision ``value`` is of; one older than our last write is a state of our own that write replaced
        (the watch delivers our quick successive writes one batch at a time), not someone else's."""
        current = self.current
        if current is None or value == self._published or (value is not None and value == self._writing):
            return
        if revision is not None and revision < self._published_revision:
            return
        log.warning(
            "the record of %s was %s by someone else; publishing it again",
            self._name,
            "deleted" if value is None else "changed",
        )
        try:
            self._published_revision = await self._store.put(self.key, self._published, lease=current.lease_id)
        except StoreError as exc:
            # Most likely our lease is gone (that deleted the record); the keepalive registers us again.
            log.warning("could not restore the record of %s: %s", self._name, exc)

    @property
    def claim_keys(self) -> tuple[str, ...]:
        """The keys of our claims (our address, our pod subnet), once registered."""
        return self._claim_keys

    async def restore_claim(self, key: str, value: bytes | None) -> None:
        """Claim again what is ours if someone deleted our claim ``key``. Every agent keeps our record as long as it
        is older than a newer claim, but a node that claims the same as well would win it: it is ours as long as we
        live, so we say so again at once. (What a claim's key holds is all it says: its value is ignored.)"""
        if key not in self.claim_keys or value is not None:
            return
        log.warning("the claim %s of %s was deleted by someone else; claiming again", key, self._name)
        try:
            await self._store.create(key, b"")
        except StoreError as exc:
            log.warning("could not claim %s again (retried with the next change): %s", key, exc)
