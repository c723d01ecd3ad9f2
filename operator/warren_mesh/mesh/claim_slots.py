"""Claims and the one-per-kind rule: what a claim is (``Reservation``), and which of a node's claims count.

A node holds one claim of each kind and IP family (a slot: its overlay address, its pod subnet): of its claims in
one slot only the oldest counts, the younger ones take nothing (surplus, removed by their owner or the operator).
So one node's credential cannot claim every address or pod subnet of the mesh (issue 28). The view
(mesh/view.py) keeps the claims that count per address and settles who holds each; this keeps the slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from warren_mesh.trust.text import printable
from warren_mesh.values.keyspace import CLAIM_KINDS


@dataclass(frozen=True, slots=True, order=True)
class Reservation:
    """A claim on an overlay address: who made it, and since when. Of several claims on one address the oldest
    (lowest create revision, then key) holds it, the same on every node."""

    create_revision: int
    key: str
    owner: str


class Slot(NamedTuple):
    """What one node may hold one of: an overlay address or a pod subnet, of one IP family."""

    owner: str
    kind: str
    version: int


@dataclass(frozen=True, slots=True, order=True)
class OwnClaim:
    claim: Reservation  # first: the oldest claim of a slot is the one that counts
    subject: str
    mod_revision: int


class ClaimSlots:
    """Every node-owned claim by slot; which one of each slot counts."""

    def __init__(self) -> None:
        self._slots: dict[Slot, dict[str, OwnClaim]] = {}
        self._slot_of: dict[str, Slot] = {}  # claim key -> its slot

    def clear(self) -> None:
        self._slots, self._slot_of = {}, {}

    def put(self, claim: OwnClaim, kind: str) -> tuple[OwnClaim | None, OwnClaim | None]:
        """Add or replace ``claim`` (its subject an address or network the view has validated); the claim of its
        slot that counted before, and the one that counts now."""
        # The family from the validated text: parsing it again cost a third of listing 10,000 claims.
        slot = Slot(claim.claim.owner, kind, 6 if ":" in claim.subject else 4)
        before = self._holder(slot)
        self._slots.setdefault(slot, {})[claim.claim.key] = claim
        self._slot_of[claim.claim.key] = slot
        return before, self._holder(slot)

    def drop(self, key: str) -> tuple[OwnClaim | None, OwnClaim | None] | None:
        """Remove the claim at ``key`` (None: no such claim); what counted before and what counts now."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return None
        before = self._holder(slot)
        own = self._slots[slot]
        del own[key]
        if not own:
            del self._slots[slot]
        return before, self._holder(slot)

    def holds(self, key: str) -> bool:
        """Whether the claim at ``key`` is still there (counting or not)."""
        return key in self._slot_of

    def keys_of(self, owner: str) -> list[str]:
        """The keys of every claim of ``owner``'s, counting or not."""
        found = (self._slots.get(Slot(owner, kind, v)) for kind in CLAIM_KINDS for v in (4, 6))
        return [key for own in found if own for key in own]

    def surplus(self, owner: str | None = None) -> list[str]:
        """The keys of ``owner``'s claims (None: every node's) that take nothing: to remove."""
        if owner is None:
            slots: list[dict[str, OwnClaim]] = list(self._slots.values())
        else:
            found = (self._slots.get(Slot(owner, kind, v)) for kind in CLAIM_KINDS for v in (4, 6))
            slots = [own for own in found if own]
        surplus: list[str] = []
        for own in slots:
            holder = min(own.values()).claim.key
            surplus.extend(key for key in own if key != holder)
        return sorted(surplus)

    def _holder(self, slot: Slot) -> OwnClaim | None:
        own = self._slots.get(slot)
        return min(own.values()) if own else None


def surplus_message(key: str, holder: OwnClaim) -> str:
    return (
        f"claim {printable(key)} takes nothing: {holder.claim.owner} already holds {holder.subject}, and a node "
        f"holds one claim of each kind; its owner removes it"
    )
