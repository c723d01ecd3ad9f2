"""Apply: carry a plan's operations out on the device, in the plan's order, and count what was done.

A change the device refuses is counted as failed and retried on a later pass; it never stops the others. The
peers to set go in one device transaction (a cold start's thousand peers); if the device refuses that, peer by
peer, so that one bad peer does not hold up the others. Runs on the device thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from warren_mesh.agent.identity import Identity
from warren_mesh.mesh.plan import Operation, Plan
from warren_mesh.wireguard.backend import Backend, BackendError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """What carrying out a plan did: device changes applied by kind (add, update, remove, add_route, ...), the
    peers added (public keys), and operations that failed."""

    applied: Counter[str] = field(default_factory=Counter)
    added: list[str] = field(default_factory=list)
    failed: int = 0

    @property
    def ok(self) -> bool:
        return self.failed == 0


class DeviceWriter:
    def __init__(self, backend: Backend, identity: Identity) -> None:
        self._backend = backend
        self._identity = identity

    def execute(self, plan: Plan, names: Mapping[str, str]) -> Outcome:
        outcome = Outcome()
        if plan.empty:
            return outcome
        if log.isEnabledFor(logging.INFO):  # explaining costs more than applying to the memory device
            log.info("applying:\n%s", plan.explain(names))
        for operation in plan.operations():
            self._run(operation, outcome)
        return outcome

    def _run(self, operation: Operation, outcome: Outcome) -> None:
        backend = self._backend
        match operation.kind:
            case "set_peers":
                if len(operation.peers) > 1 and self._set_all(operation, outcome):
                    return
                for change in operation.peers:
                    set_peer = partial(backend.set_peer, change.spec, adding=change.adding)
                    if self._attempt(change.action, set_peer, outcome) and change.action == "add":
                        outcome.added.append(change.public_key)
            case "remove":
                for change in operation.peers:
                    self._attempt("remove", partial(backend.remove_peer, change.spec), outcome)
            case "private_key":
                self._attempt("private_key", partial(backend.set_private_key, self._identity.key), outcome)
            case "interface":
                interface = operation.interface
                assert interface is not None
                self._attempt("interface", partial(backend.configure_interface, interface), outcome)
            case "add_route":
                self._attempt("add_route", partial(backend.add_route, operation.network), outcome)
            case "remove_route":
                self._attempt("remove_route", partial(backend.remove_route, operation.network), outcome)

    def _set_all(self, operation: Operation, outcome: Outcome) -> bool:
        """All peers in one go; False (nothing counted) if the device refused, to go peer by peer instead."""
        try:
            adding = {change.public_key: change.adding for change in operation.peers if change.adding is not None}
            self._backend.set_peers([change.spec for change in operation.peers], adding=adding)
        except BackendError as exc:
            log.warning("setting %d peers at once failed (%s); setting them one by one", len(operation.peers), exc)
            return False
        for change in operation.peers:
            outcome.applied[change.action] += 1
            if change.action == "add":
                outcome.added.append(change.public_key)
        return True

    def _attempt(self, kind: str, call: Callable[[], None], outcome: Outcome) -> bool:
        try:
            call()
        except BackendError as exc:
            outcome.failed += 1
            log.error("device change %s failed (retrying): %s", kind, exc)
            return False
        outcome.applied[kind] += 1
        return True
