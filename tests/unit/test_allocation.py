"""The registrar's allocation, pure: what a node holds among the claims every agent sees alike, and the order in
which it tries the free ones."""

from __future__ import annotations

import ipaddress

import pytest

from unit.stage_parts import SCHEMA
from warren_mesh.mesh import allocation
from warren_mesh.mesh.allocation import RegistrationConflict
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.records import MeshConfig, PodNetwork
from warren_mesh.values.keyspace import ClaimKind
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot

CONFIG = MeshConfig(
    overlay_cidrs=(ipaddress.ip_network("10.96.0.0/29"),),  # usable .1-.6
    pod_networks=(PodNetwork(ipaddress.ip_network("10.244.0.0/22"), 24),),  # four /24s
)


def _claims(*claims: tuple[str, str, ClaimKind]) -> MeshView:
    """A view of claims (node, subject, kind), the first made first."""
    items = tuple(
        KeyValue(SCHEMA.claim(node, subject, kind), b"", revision, revision)
        for revision, (node, subject, kind) in enumerate(claims, start=2)
    )
    view = MeshView(SCHEMA)
    view.apply(Snapshot(items, len(items) + 1))
    return view


def test_a_node_holds_its_oldest_claims_and_withdraws_those_it_lost() -> None:
    view = _claims(
        ("a", "10.96.0.3", "overlay"),
        ("b", "10.96.0.4", "overlay"),
        ("b", "10.244.1.0/24", "pods"),
        ("a", "10.244.1.0/24", "pods"),  # younger than b's: a lost it
    )
    b = allocation.holdings(view, CONFIG, "b", SCHEMA)
    assert str(b.addresses[4]) == "10.96.0.4" and str(b.subnets[4]) == "10.244.1.0/24" and not b.withdraw
    assert b.taken_addresses[4] == {int(ipaddress.ip_address("10.96.0.3"))}
    a = allocation.holdings(view, CONFIG, "a", SCHEMA)
    assert str(a.addresses[4]) == "10.96.0.3" and not a.subnets
    assert a.withdraw == {SCHEMA.claim("a", "10.244.1.0/24", "pods"): "b holds 10.244.1.0/24"}
    assert a.taken_subnets == {"10.244.1.0/24"}


def test_a_node_holds_one_claim_of_a_kind_its_oldest_and_withdraws_every_other_before_claiming() -> None:
    """Only a node's oldest claim of each kind counts: one node cannot take every address or subnet of the mesh.
    Whatever else of its own stands (younger claims, ones that lost, ones outside the mesh's networks) is
    withdrawn before it claims, or its new claim, younger than all of them, would take nothing."""
    view = _claims(
        ("a", "10.96.0.3", "overlay"),
        ("b", "10.96.0.3", "overlay"),  # b's oldest address claim, and younger than a's: b lost it
        ("b", "10.96.0.5", "overlay"),  # younger than b's first: takes nothing
        ("b", "10.96.0.6", "overlay"),
        ("b", "10.244.1.0/24", "pods"),
        ("b", "10.244.2.0/24", "pods"),  # takes nothing
        ("c", "10.99.0.1", "overlay"),  # outside the overlay network: held, of no use to this mesh
    )
    assert set(view.reservations) == {"10.96.0.3", "10.244.1.0/24", "10.99.0.1"}
    assert view.surplus_claims("b") == sorted(
        [SCHEMA.claim("b", "10.96.0.5"), SCHEMA.claim("b", "10.96.0.6"), SCHEMA.claim("b", "10.244.2.0/24", "pods")]
    )
    assert view.rejected_by_reason() == {"surplus_claim": 3}
    b = allocation.holdings(view, CONFIG, "b", SCHEMA)
    assert not b.addresses and str(b.subnets[4]) == "10.244.1.0/24"
    assert set(b.withdraw) == {SCHEMA.claim("b", "10.96.0.3"), *view.surplus_claims("b")}
    assert b.taken_addresses[4] == {int(ipaddress.ip_address(a)) for a in ("10.96.0.3", "10.99.0.1")}  # .5, .6 free
    c = allocation.holdings(view, CONFIG, "c", SCHEMA)
    assert not c.addresses and c.withdraw == {
        SCHEMA.claim("c", "10.99.0.1"): "10.99.0.1 is outside the mesh's overlay networks"
    }


def test_when_a_nodes_claim_goes_its_next_oldest_counts() -> None:
    view = _claims(("b", "10.96.0.5", "overlay"), ("b", "10.96.0.6", "overlay"))
    assert view.reservations["10.96.0.5"].owner == "b" and "10.96.0.6" not in view.reservations
    view.apply(Events((Event("delete", KeyValue(SCHEMA.claim("b", "10.96.0.5"), b"", 0, 0)),), 10))
    assert view.reservations["10.96.0.6"].owner == "b" and "10.96.0.5" not in view.reservations
    assert view.surplus_claims("b") == [] and view.rejected_by_reason() == {}


def test_candidates_start_where_the_name_hashes_and_skip_what_is_taken() -> None:
    taken = {int(ipaddress.ip_address("10.96.0.1")), int(ipaddress.ip_address("10.96.0.2"))}
    order = [str(a) for a in allocation.address_candidates("n7", CONFIG.overlay_cidrs[0], taken)]
    assert sorted(order) == ["10.96.0.3", "10.96.0.4", "10.96.0.5", "10.96.0.6"]
    start = allocation.start_index("n7", 6)
    expected = [f"10.96.0.{1 + (start + i) % 6}" for i in range(6)]
    assert order == [a for a in expected if a not in ("10.96.0.1", "10.96.0.2")]
    assert order == [str(a) for a in allocation.address_candidates("n7", CONFIG.overlay_cidrs[0], taken)]
    subnets = [str(s) for s in allocation.subnet_candidates("n7", CONFIG.pod_networks[0], {"10.244.0.0/24"})]
    assert sorted(subnets) == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]


def test_a_pinned_subnet_must_be_one_of_the_mesh_and_free() -> None:
    found = allocation.holdings(_claims(("x", "10.244.2.0/24", "pods")), CONFIG, "n1", SCHEMA)
    assert str(allocation.pinned_subnet(ipaddress.ip_network("10.244.3.0/24"), CONFIG, found)) == "10.244.3.0/24"
    with pytest.raises(RegistrationConflict, match="claimed by another node"):
        allocation.pinned_subnet(ipaddress.ip_network("10.244.2.0/24"), CONFIG, found)
    with pytest.raises(RegistrationConflict, match=r"is not a node subnet of the pod networks \(/24 of"):
        allocation.pinned_subnet(ipaddress.ip_network("10.245.0.0/24"), CONFIG, found)
