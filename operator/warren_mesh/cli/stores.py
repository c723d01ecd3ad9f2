"""The one way a one-shot command opens etcd: with the store flags' endpoints and credentials, closed when done."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from warren_mesh.settings import StoreSettings
from warren_mesh.store.etcd import EtcdStore


@contextlib.asynccontextmanager
async def open_store(settings: StoreSettings, *, call_timeout: float = 5.0) -> AsyncIterator[EtcdStore]:
    """``call_timeout``: how long one request may take (the read-only commands give up sooner: a user waits)."""
    store = EtcdStore(settings.etcd_endpoints, tls=settings.tls, call_timeout=call_timeout)
    try:
        yield store
    finally:
        await store.close()
