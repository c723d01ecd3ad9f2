"""Observe: the watch stream folded into the mesh view, one batch at a time, in revision order.

Each batch wakes the reconciler (which decides and applies on its own schedule), and tells this node about
itself: its own record or address reservation changed or deleted by someone else is written back at once, and a
config change that alters what its record says is published again.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.agent.registrar import Registrar
from warren_mesh.mesh.peers import MeshView
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.store.base import Store, StoreUnavailable
from warren_mesh.watch import Events, Snapshot, WatchResult

log = logging.getLogger(__name__)


class MeshObserver:
    def __init__(
        self,
        *,
        store: Store,
        view: MeshView,
        reconciler: Reconciler,
        registrar: Registrar,
        metrics: AgentMetrics,
        node_key: str,
        rotation_key: str = "",
        on_rotation_request: Callable[[bytes], None] | None = None,
    ) -> None:
        self._store = store
        self._view = view
        self._reconciler = reconciler
        self._registrar = registrar
        self._metrics = metrics
        self._node_key = node_key  # where this node's own record lives
        self._rotation_key = rotation_key  # where `warren-mesh rotate-key` asks this node for a new key
        self._on_rotation_request = on_rotation_request

    async def run(self) -> None:
        """Forever (the watch resumes by itself after any failure of etcd's)."""
        view, registrar, metrics = self._view, self._registrar, self._metrics
        config = view.config
        async for result in self._store.observe(
            view.schema.root, on_restart=lambda reason: metrics.watch_restarts.labels(reason).inc()
        ):
            if isinstance(result, Events):
                metrics.watch_events.inc(len(result.events))
            mentioned, own_value = _value_after(result, self._node_key)
            if self._on_rotation_request is not None:
                asked, request = _value_after(result, self._rotation_key)
                if asked and request is not None:
                    self._on_rotation_request(request)
            claims = [(key, *_value_after(result, key)) for key in registrar.reservation_keys]
            first = not view.synced
            view.apply(result)
            self._reconciler.notify()
            if first:
                # Everything so far (modules, metrics, the whole mesh as listed) lives as long as the agent: take
                # it out of the cyclic collector's generations, whose full collections would otherwise walk it
                # again and again (pauses of tens of ms at a thousand peers, the tail of convergence lag).
                gc.freeze()
            if mentioned:
                await registrar.restore(own_value)
            for key, mentioned_claim, claim_value in claims:
                if mentioned_claim:
                    await registrar.restore_reservation(key, claim_value)
            if view.config != config:
                try:
                    await registrar.republish(view.config)
                    config = view.config
                except StoreUnavailable as exc:
                    log.warning("could not republish after a config change (retried with the next event): %s", exc)


def _value_after(result: WatchResult, key: str) -> tuple[bool, bytes | None]:
    """Whether ``result`` tells anything about ``key`` and, if so, its value afterwards (None: deleted or absent)."""
    if isinstance(result, Snapshot):
        return True, next((kv.value for kv in result.items if kv.key == key), None)
    latest = [event for event in result.events if event.kv.key == key]
    if not latest:
        return False, None
    return True, latest[-1].kv.value if latest[-1].kind == "put" else None
