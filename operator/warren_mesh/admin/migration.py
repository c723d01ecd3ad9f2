"""Moving a mesh from shared ``ipam/<address>`` reservations to node-owned claims (``claims/<node>/overlay/``).

Any node could write any ``ipam/`` key, so none of them can be protected by etcd's per-node roles. Agents of
this version already honour both (the oldest of all claims on an address holds it), claim their own address
under ``claims/`` when they register, and never write ``ipam/``. This moves what is left, one address per
transaction, keeping who holds each address exactly as every agent sees it now:

- the holder's claim is created if it is missing;
- younger claims of other nodes on that address (which lost to the reservation) are removed, since once the old
  reservation is gone they would be older than the holder's new claim;
- the ``ipam/`` key is deleted.

Each transaction goes through only if none of those keys changed since they were read; a changed address is read
again on the next run. Run it with the admin's credentials before etcd's auth is turned on (then only the
admin can delete ``ipam/`` keys). Running it again does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from warren_mesh.mesh.view import MeshView
from warren_mesh.store.base import Store
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot


@dataclass(slots=True)
class MigrationReport:
    moved: list[str] = field(default_factory=list)  # "address -> node"
    dropped: list[str] = field(default_factory=list)  # reservations that held nothing (a claim was older)
    invalid: list[str] = field(default_factory=list)  # ipam/ keys no agent honours (left for the admin)
    changed: list[str] = field(default_factory=list)  # addresses that changed while migrating: run again

    def lines(self) -> list[str]:
        out = [f"moved {m}" for m in self.moved] + [f"dropped {d}" for d in self.dropped]
        out += [f"left invalid reservation {k} (delete it by hand)" for k in self.invalid]
        out += [f"{a} changed meanwhile; run again" for a in self.changed]
        return out


async def migrate_reservations(store: Store, schema: KeySchema) -> MigrationReport:
    claims = await store.list_prefix(schema.claims)
    legacy = await store.list_prefix(schema.ipam)
    view = MeshView(schema)
    view.apply(Snapshot(claims.items + legacy.items, max(claims.revision, legacy.revision)))
    revisions = {kv.key: kv.mod_revision for kv in claims.items + legacy.items}
    report = MigrationReport()
    for kv in legacy.items:
        await _migrate_one(store, schema, kv, view=view, revisions=revisions, report=report)
    return report


async def _migrate_one(
    store: Store, schema: KeySchema, kv: KeyValue, *, view: MeshView, revisions: dict[str, int], report: MigrationReport
) -> None:
    address = kv.key[len(schema.ipam) :]
    holder = view.reservations.get(address)
    on_address = view.claims_on(address)
    if not any(claim.key == kv.key for claim in on_address):
        report.invalid.append(kv.key)  # no agent honours it: nothing to keep
        return
    assert holder is not None
    unchanged = [(claim.key, revisions[claim.key]) for claim in on_address]
    puts: list[tuple[str, bytes]] = []
    deletes = [kv.key]
    if holder.key == kv.key:
        own = schema.claim(holder.owner, address)
        if own not in revisions:
            puts.append((own, b""))
            unchanged.append((own, 0))
        deletes += [claim.key for claim in on_address if claim.key not in (kv.key, own)]
    if not await store.commit(unchanged=unchanged, puts=puts, deletes=deletes):
        report.changed.append(address)
    elif holder.key == kv.key:
        report.moved.append(f"{address} -> {holder.owner}")
    else:
        report.dropped.append(f"{kv.key} (held by {holder.owner}'s older claim)")
