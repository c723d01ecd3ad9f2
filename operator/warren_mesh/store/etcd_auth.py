"""etcd's own users, roles and key-range permissions (its Auth API), as the admin sets them up.

With ``--client-cert-auth`` etcd takes the common name of a client's certificate as its user name, so users here
have no password. Every call is idempotent: what exists already is left as it is, so a set-up can be run again
after adding nodes. Only etcd's root user may call these once auth is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from etcd3.etcdrpc import auth_pb2, rpc_pb2

from warren_mesh.store.base import StoreError
from warren_mesh.store.connection import prefix_range_end, wire_key
from warren_mesh.store.etcd import EtcdStore

Access = Literal["read", "write", "readwrite"]
_NO_PASSWORD = b"\x1a\x02\x08\x01"  # field 3 (length 2) holding field 1 = true
_PERM_TYPES = {
    "read": auth_pb2.Permission.READ,
    "write": auth_pb2.Permission.WRITE,
    "readwrite": auth_pb2.Permission.READWRITE,
}


@dataclass(frozen=True, slots=True)
class Permission:
    access: Access
    key: str
    prefix: bool  # the whole range of keys starting with ``key``, else that one key


class EtcdAuth:
    def __init__(self, store: EtcdStore) -> None:
        self._store = store

    @property
    def store(self) -> EtcdStore:
        """The admin's store these calls go through (for the keys that go with users and roles)."""
        return self._store

    async def _call(self, stub: str, method: str, request: object) -> object:
        try:
            return await self._store.connection.call(stub, method, request)
        except StoreError as exc:
            if "already exists" in str(exc) or "already enabled" in str(exc):
                return None  # what we asked for is there
            raise

    async def add_user(self, name: str) -> None:
        """A user that can only log in with a certificate naming it (etcd 3.4's ``no_password`` option: field 3,
        ``UserAddOptions{no_password: true}``, which the etcd3 package's messages lack)."""
        request = rpc_pb2.AuthUserAddRequest(name=name).SerializeToString() + _NO_PASSWORD
        await self._call("raw_auth", "UserAdd", request)

    async def add_role(self, name: str, permissions: list[Permission]) -> None:
        await self._call("auth", "RoleAdd", rpc_pb2.AuthRoleAddRequest(name=name))
        for permission in permissions:
            key = wire_key(permission.key)
            perm = auth_pb2.Permission(
                permType=_PERM_TYPES[permission.access],
                key=key,
                range_end=prefix_range_end(key) if permission.prefix else b"",
            )
            await self._call(
                "auth", "RoleGrantPermission", rpc_pb2.AuthRoleGrantPermissionRequest(name=name, perm=perm)
            )

    async def revoke_permission(self, role: str, permission: Permission) -> None:
        """Take ``permission`` from ``role``; done already (or no such role) is done."""
        key = wire_key(permission.key)
        request = rpc_pb2.AuthRoleRevokePermissionRequest(
            role=role, key=key, range_end=prefix_range_end(key) if permission.prefix else b""
        )
        try:
            await self._store.connection.call("auth", "RoleRevokePermission", request)
        except StoreError as exc:
            if "not granted" not in str(exc) and "role name not found" not in str(exc):
                raise

    async def grant_role(self, user: str, role: str) -> None:
        await self._call("auth", "UserGrantRole", rpc_pb2.AuthUserGrantRoleRequest(user=user, role=role))

    async def enable(self) -> None:
        await self._call("auth", "AuthEnable", rpc_pb2.AuthEnableRequest())
