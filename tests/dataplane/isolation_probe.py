"""Run inside a lab's hub namespace (where etcd listens): with every node's credential, try every write on every
other node's keys, the config and the peers, and revoking the other's lease. Prints one JSON object: the attempts
etcd did not refuse with PermissionDenied (must be none) and how many were made.

Usage: isolation_probe.py ENDPOINT PKI_DIR PREFIX NODE...
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from warren_mesh.identity import pki
from warren_mesh.identity.etcd_tls import EtcdTls
from warren_mesh.store.base import StoreError
from warren_mesh.store.etcd import EtcdStore
from warren_mesh.values.keyspace import KeySchema


def _store(endpoint: str, directory: Path, user: str) -> EtcdStore:
    return EtcdStore(
        endpoint, tls=EtcdTls(directory / "ca.pem", directory / f"{user}.pem", directory / f"{user}-key.pem")
    )


async def probe(endpoint: str, directory: Path, schema: KeySchema, nodes: list[str]) -> dict[str, object]:
    admin = _store(endpoint, directory, "admin")
    snapshot = await admin.list_prefix(schema.root)
    leases = {kv.key: kv.lease for kv in snapshot.items}
    claims = {kv.key for kv in snapshot.items if kv.key.startswith(schema.claims)}
    allowed: list[str] = []
    attempts = 0
    for attacker in nodes:
        store = _store(endpoint, directory, pki.node_user(attacker))
        try:
            for victim in nodes:
                if victim == attacker:
                    continue
                keys = [schema.node(victim), schema.claim(victim, "10.96.254.254")]  # an existing key, a new one
                keys += sorted(k for k in claims if k.startswith(schema.claims_of(victim)))
                keys += [schema.config, schema.peer("intruder"), schema.legacy_reservation("10.96.254.254")]
                writes: list[tuple[str, Callable[[], Awaitable[object]]]] = []
                for key in keys:
                    writes += [
                        (f"put {key}", functools.partial(store.put, key, b"{}")),
                        (f"delete {key}", functools.partial(store.delete, key)),
                        (f"create {key}", functools.partial(store.create, key, b"{}")),
                    ]
                lease = leases[schema.node(victim)]
                writes.append((f"revoke {victim}'s lease", functools.partial(store.revoke_lease, lease)))
                for what, write in writes:
                    attempts += 1
                    try:
                        await write()
                    except StoreError as exc:
                        if "PERMISSION_DENIED" not in str(exc):
                            allowed.append(f"{attacker}: {what}: {exc}")
                    else:
                        allowed.append(f"{attacker}: {what}: done")
        finally:
            await store.close()
    after = await admin.list_prefix(schema.root)
    await admin.close()
    before_keys = {(kv.key, kv.value, kv.mod_revision) for kv in snapshot.items}
    after_keys = {(kv.key, kv.value, kv.mod_revision) for kv in after.items}
    return {"allowed": allowed, "attempts": attempts, "unchanged": before_keys == after_keys}


if __name__ == "__main__":
    endpoint, directory, prefix, *names = sys.argv[1:]
    print(json.dumps(asyncio.run(probe(endpoint, Path(directory), KeySchema(prefix), names))))
