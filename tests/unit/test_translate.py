"""The operator's translation between custom resources and the mesh's records, pure: a spec is checked exactly as
agents check what it becomes, and the mesh comes back as MeshNodes."""

from __future__ import annotations

import pytest

from unit.stage_parts import record
from warren_mesh.controller import translate
from warren_mesh.controller.translate import MeshClaim, SpecError
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.view import Entry
from warren_mesh.trust.records import MeshConfig


def test_a_mesh_spec_becomes_the_config_agents_read_and_a_bad_one_names_the_crd_field() -> None:
    config = translate.mesh_config({"overlayCIDR": "10.100.0.0/16", "mtu": "1400", "leaseTTLSeconds": 15})
    assert str(config.overlay_cidrs[0]) == "10.100.0.0/16" and config.mtu == 1400 and config.lease_ttl_seconds == 15
    with pytest.raises(SpecError, match="overlayCIDR") as refused:
        translate.mesh_config({"overlayCIDR": "10.100.0.1/16"})
    assert refused.value.reason == "InvalidSpec"
    with pytest.raises(SpecError) as bad_prefix:
        translate.mesh_schema({"etcdPrefix": "no-slash"})
    assert bad_prefix.value.reason == "InvalidPrefix"
    assert translate.mesh_schema({}).prefix == "/warren/mesh"


def test_the_oldest_mesh_on_a_prefix_owns_it() -> None:
    claims = [
        MeshClaim("late", "/warren/mesh", "2026-01-02T00:00:00Z"),
        MeshClaim("early", "/warren/mesh", "2026-01-01T00:00:00Z"),
        MeshClaim("other", "/other", "2025-01-01T00:00:00Z"),
    ]
    assert translate.prefix_owner("/warren/mesh", claims) == "early"
    assert translate.prefix_owner("/nobody", claims) is None


def test_a_mesh_peer_spec_is_an_external_peer_or_a_clear_refusal() -> None:
    key = NodeKey.generate().public_key
    peer = translate.external_peer("laptop", {"publicKey": key, "allowedIPs": ["10.96.200.1/32"]})
    assert peer.public_key == key and [str(n) for n in peer.allowed_ips] == ["10.96.200.1/32"]
    with pytest.raises(SpecError, match="public"):
        translate.external_peer("laptop", {"publicKey": "nope", "allowedIPs": ["10.96.200.1/32"]})


def test_a_node_record_comes_back_as_a_mesh_node() -> None:
    node = record("n1", 1)
    body = translate.mesh_node_body("blue", Entry(node, 5, 5, 0), {"ready": True}, kubernetes_node=True)
    assert body["metadata"]["name"] == "blue.n1" and translate.mesh_node_name("default", "n1") == "n1"
    assert body["metadata"]["labels"][translate.KUBERNETES_NODE_LABEL] == "true"
    assert body["spec"] == {
        "mesh": "blue",
        "nodeName": "n1",
        "publicKey": node.public_key,
        "endpoint": "192.0.2.11:51820",
        "endpoints": ["192.0.2.11:51820"],
        "overlayIP": "10.96.0.11",
        "overlayIPs": ["10.96.0.11"],
        "allowedIPs": ["10.244.1.0/24"],
    }


def test_the_ready_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    first = translate.ready_condition(True, "Synced", "ok", 3)
    previous = [{**first, "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = translate.ready_condition(True, "Synced", "still ok", 4, previous)
    assert same["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same["observedGeneration"] == 4
    flipped = translate.ready_condition(False, "InvalidSpec", "bad", 5, previous)
    assert flipped["lastTransitionTime"] != "2026-01-01T00:00:00Z" and flipped["status"] == "False"


def test_a_dual_stack_mesh_spec_gives_both_families_and_its_lists_replace_the_defaulted_single_fields() -> None:
    # What the API server hands the operator: overlayCIDR and podCIDR defaulted, the lists as the user wrote them.
    spec = {
        "overlayCIDR": "10.96.0.0/16",
        "podCIDR": "10.244.0.0/16",
        "overlayCIDRs": ["fd96::/64", "10.96.0.0/16"],
        "podCIDRs": ["fd44::/56", "10.244.0.0/16"],
        "nodeSubnetPrefixLengthIPv6": 72,
    }
    config = translate.mesh_config(spec)
    assert [str(n) for n in config.overlay_cidrs] == ["fd96::/64", "10.96.0.0/16"]  # IPv6 primary, as written
    assert [(str(p.cidr), p.node_prefix) for p in config.pod_networks] == [("fd44::/56", 72), ("10.244.0.0/16", 24)]
    assert translate.mesh_config(spec | {"masqueradeIPv4": True, "masqueradeIPv6": False}).masquerade == (4,)
    with pytest.raises(translate.SpecError, match=r"masqueradeIPv6 .yes. is not true or false"):
        translate.mesh_config(spec | {"masqueradeIPv6": "yes"})
    with pytest.raises(translate.SpecError, match="overlayCIDRs must be one network, or one IPv4 and one IPv6"):
        translate.mesh_config({"overlayCIDRs": ["10.96.0.0/16", "10.97.0.0/16"]})


def test_a_mesh_spec_may_name_who_may_be_gateways_and_relays() -> None:
    """docs/topology.md: absent, anyone who can; listed, only those; an empty list of relays, none; a name that is
    not a node name is refused with the field's name."""
    assert translate.mesh_config({}).gateways is None and translate.mesh_config({}).relays is None
    config = translate.mesh_config({"gateways": ["node-b", "node-a", "node-a"], "relays": []})
    assert config.gateways == ("node-a", "node-b") and config.relays == ()
    assert MeshConfig.from_json(config.to_json()) == config
    with pytest.raises(SpecError, match="Node_A"):
        translate.mesh_config({"gateways": ["Node_A"]})
