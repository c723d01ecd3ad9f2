"""Who may write what in etcd: the mesh's roles, one per node and one for the operator (docs/security.md).

- A node reads the whole mesh and writes only its own record (``nodes/<node>``) and its own claims
  (``claims/<node>/``). It cannot touch another node's keys, the config or the external peers.
- The operator reads the whole mesh, writes the config and the external peers, and may delete node records and
  claims: etcd lets a lease be revoked only by a user who may write every key on it, and freeing the address of a
  node gone for good is a deletion of its claim.
- The admin (etcd's ``root``, the admin certificate) does everything else: users, roles, migrations.

Users are the common names of the certificates ``warren_mesh.identity.pki`` issues. Setting up is idempotent: run it
again to add nodes.
"""

from __future__ import annotations

from collections.abc import Iterable

from warren_mesh.identity import pki
from warren_mesh.store.base import Store
from warren_mesh.store.etcd_auth import EtcdAuth, Permission
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import encode_json
from warren_mesh.trust.text import printable
from warren_mesh.values.keyspace import KeySchema

ROOT_ROLE = "root"


def node_permissions(schema: KeySchema, node: str) -> list[Permission]:
    return [Permission("read", schema.root, prefix=True), *_node_writes(schema, node)]


def _node_writes(schema: KeySchema, node: str) -> list[Permission]:
    return [
        Permission("readwrite", schema.node(node), prefix=False),
        Permission("readwrite", schema.claims_of(node), prefix=True),
    ]


def operator_permissions(schema: KeySchema) -> list[Permission]:
    return [
        Permission("read", schema.root, prefix=True),
        Permission("readwrite", schema.config, prefix=False),
        Permission("readwrite", schema.peers, prefix=True),
        Permission("readwrite", schema.nodes, prefix=True),
        Permission("readwrite", schema.claims, prefix=True),
        Permission("readwrite", schema.locations, prefix=True),
    ]


async def add_node(auth: EtcdAuth, schema: KeySchema, node: str) -> None:
    """The user of ``node``'s certificate, with a role of its own that may write only that node's keys."""
    user = pki.node_user(node)
    await auth.add_user(user)
    await auth.add_role(user, node_permissions(schema, node))
    await auth.grant_role(user, user)


async def suspend_node(auth: EtcdAuth, schema: KeySchema, node: str, why: str) -> None:
    """Take ``node``'s write permissions away (it keeps reading: its agent stays in the mesh, its record lives
    until its lease ends) and mark it suspended, so that enrolling again does not give them back: only
    ``restore_node`` does. Idempotent; the marker goes first, so a concurrent enrolment either sees it or has its
    grants revoked right after."""
    await auth.store.put(schema.suspension(node), encode_json({"reason": why}))
    await revoke_writes(auth, schema, node)


async def revoke_writes(auth: EtcdAuth, schema: KeySchema, node: str) -> None:
    for permission in _node_writes(schema, node):
        await auth.revoke_permission(pki.node_user(node), permission)


async def restore_node(auth: EtcdAuth, schema: KeySchema, node: str) -> bool:
    """Give a suspended ``node`` its write permissions back; whether it was suspended."""
    suspended = await auth.store.get(schema.suspension(node)) is not None
    await add_node(auth, schema, node)
    await auth.store.delete(schema.suspension(node))
    return suspended


async def suspension(store: Store, schema: KeySchema, node: str) -> str | None:
    """Why ``node`` is suspended (see ``suspend_node``); None if it is not."""
    kv = await store.get(schema.suspension(node))
    if kv is None:
        return None
    try:
        document = decode_json(kv.value)
    except RecordError:
        return "suspended (the reason recorded is unreadable)"
    reason = document.get("reason") if isinstance(document, dict) else None
    return printable(reason) if isinstance(reason, str) else "suspended"


async def set_up(auth: EtcdAuth, schema: KeySchema, nodes: Iterable[str]) -> None:
    """Root, the operator and ``nodes``, then auth on (etcd refuses to enable it without a root user)."""
    await auth.add_user(pki.ADMIN_USER)
    await auth.add_role(ROOT_ROLE, [])
    await auth.grant_role(pki.ADMIN_USER, ROOT_ROLE)
    await auth.add_user(pki.OPERATOR_USER)
    await auth.add_role(pki.OPERATOR_USER, operator_permissions(schema))
    await auth.grant_role(pki.OPERATOR_USER, pki.OPERATOR_USER)
    for node in nodes:
        await add_node(auth, schema, node)
    await auth.enable()
