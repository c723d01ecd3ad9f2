"""The mesh as etcd holds it now, read once and judged by the agents' rules: what every admin tool starts from
(`status`, `showconf`, `graph`, `peer`)."""

from __future__ import annotations

from warren_mesh.mesh.changes import Rejection
from warren_mesh.mesh.view import MeshView
from warren_mesh.store.base import Store
from warren_mesh.values.keyspace import KeySchema


async def read_view(store: Store, schema: KeySchema) -> MeshView:
    """The mesh as etcd holds it now, judged by the agents' rules (`status`, `showconf`, `graph`, `peer`)."""
    view, _ = await read_view_judged(store, schema)
    return view


async def read_view_judged(store: Store, schema: KeySchema) -> tuple[MeshView, tuple[Rejection, ...]]:
    """``read_view``, and the records it refused."""
    view = MeshView(schema)
    changes = view.apply(await store.list_prefix(schema.root))
    return view, changes.rejections
