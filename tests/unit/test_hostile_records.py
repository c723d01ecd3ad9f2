"""Records an attacker with write access to etcd could write, class by class: each one is rejected or left out on
its own, never raises out of the view, never reaches the desired device, and never costs a valid peer its place.
"""

from __future__ import annotations

import base64
import json
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from hostile import ATTACKER_KEY, HONEST, LOCAL, LOCAL_KEY, SCHEMA, Mesh, node_doc, peer_doc
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.topology import TopologyBuilder
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.decode import MAX_VALUE_BYTES, decode_json
from warren_mesh.trust.fields import LOW_ORDER_POINTS
from warren_mesh.trust.records import MeshConfig, encode_json
from warren_mesh.values.watch import KeyValue, Snapshot


def test_honest_mesh_is_whole() -> None:
    Mesh().assert_honest_intact()


# --- records that used to crash every agent ----------------------------------------------------------------------

CRASHERS: dict[str, bytes | dict[str, object]] = {
    "no overlay_ip": {k: v for k, v in node_doc("x", ATTACKER_KEY, "", "192.0.2.9:1").items() if k != "overlay_ip"},
    "port of 5000 digits": b'{"schema":1,"name":"x","listen_port":' + b"9" * 5000 + b"}",
    "endpoint port of 5000 digits": node_doc("x", ATTACKER_KEY, "10.96.0.99", "192.0.2.9:" + "9" * 5000),
    "unicode digit in the port": node_doc("x", ATTACKER_KEY, "10.96.0.99", "203.0.113.5:\u00b2"),
    "2000 deep": b'{"schema":1,"name":"x","a":' + b"[" * 2000 + b"]" * 2000 + b"}",
    "2000 deep inside strings and out": b'{"n":"' + b"[" * 3000 + b'","a":' + b"[" * 2000 + b"]" * 2000 + b"}",
    "NaN": b'{"schema":1,"published_at":NaN}',
    "Infinity": node_doc("x", ATTACKER_KEY, "10.96.0.99", "192.0.2.9:1", published_at=1e400),
    "schema true": node_doc("x", ATTACKER_KEY, "10.96.0.99", "192.0.2.9:1", schema=True),
    "name is a list": node_doc("x", ATTACKER_KEY, "10.96.0.99", "192.0.2.9:1") | {"name": ["x"]},
    "NUL in the address": node_doc("x", ATTACKER_KEY, "10.96.0.99\x00", "192.0.2.9:1"),
    "not UTF-8": b"\xff\xfe\xfd",
    "a megabyte": b'{"schema":1,"name":"' + b"a" * 1_000_000 + b'"}',
}


# A config ignores fields it does not know (a newer operator may write more), so only these apply to it.
CONFIG_CRASHERS = ["2000 deep", "2000 deep inside strings and out", "NaN", "Infinity", "schema true", "not UTF-8"]


@pytest.mark.parametrize(
    ("case", "kind"),
    [(case, kind) for case in sorted(CRASHERS) for kind in ("node", "peer")] + [(c, "config") for c in CONFIG_CRASHERS],
)
def test_records_that_crashed_agents_are_rejected_alone(case: str, kind: str) -> None:
    mesh = Mesh()
    key = {"node": SCHEMA.node("x"), "peer": SCHEMA.peer("x"), "config": SCHEMA.config}[kind]
    value = CRASHERS[case]
    mesh.put(key, value)
    assert mesh.rejections, "the record was taken"
    assert all(len(r.message) < 400 for r in mesh.rejections), "a rejection message is not bounded"
    mesh.assert_honest_intact()


def test_a_megabyte_record_makes_one_short_log_line(caplog: pytest.LogCaptureFixture) -> None:
    mesh = Mesh()
    with caplog.at_level(logging.WARNING):
        mesh.put(SCHEMA.node("x"), b'{"schema":1,"name":"' + b"\xe2\x80\xae" * 400_000 + b'"}')
        mesh.put(SCHEMA.node("y"), encode_json(node_doc("y", "\u202e" * 1_000, "10.96.0.99", "192.0.2.9:1")))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(len(line) < 600 and line.isascii() for line in lines)
    assert {r.reason for r in mesh.rejections} == {"too_large", "invalid_public_key"}


@pytest.mark.parametrize(
    "key",
    [
        SCHEMA.node("x").encode() + b"\xff",
        SCHEMA.root.encode() + b"\xc0\x80",
        SCHEMA.node("UPPER").encode(),
        SCHEMA.node("x" * 600).encode(),
    ],
)
def test_keys_that_are_not_utf8_or_not_names_are_rejected_and_their_deletion_is_seen(key: bytes) -> None:
    mesh = Mesh()
    text = key.decode("utf-8", "surrogateescape")  # as store.wire decodes keys
    mesh.put(text, encode_json(node_doc("x", ATTACKER_KEY, "10.96.0.99", "192.0.2.9:1")))
    mesh.delete(text)
    mesh.assert_honest_intact()
    assert not mesh.view.rejected_by_reason(), "a deleted key is still reported"


def test_a_record_that_breaks_our_own_code_is_rejected_as_unexpected(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = Mesh()

    def broken(*_: object, **__: object) -> object:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("warren_mesh.mesh.view.ExternalPeer.from_json", broken)
    mesh.put(SCHEMA.peer("x"), peer_doc("x"))
    assert [r.reason for r in mesh.rejections] == ["unexpected_error"]
    mesh.assert_honest_intact()


# --- networks no record may claim ---------------------------------------------------------------------------------

FORBIDDEN = [
    ["::/0"],
    ["0.0.0.0/0"],
    ["0.0.0.0/1", "128.0.0.0/1"],
    ["::/1"],
    ["8000::/1"],
    ["127.0.0.0/8"],
    ["127.0.0.1/32"],
    ["::1/128"],
    ["169.254.169.254/32"],
    ["224.0.0.0/4"],
    ["255.255.255.255/32"],
    ["fe80::/64"],
    ["ff02::1/128"],
    ["::ffff:10.0.0.0/104"],
    ["0.0.0.0/8"],
    ["10.0.0.0/7"],
]


@pytest.mark.parametrize("networks", FORBIDDEN, ids="+".join)
@pytest.mark.parametrize("kind", ["node", "peer"])
def test_networks_outside_what_the_mesh_owns_are_refused(networks: list[str], kind: str) -> None:
    mesh = Mesh()
    if kind == "node":
        mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.99", "192.0.2.9:1", allowed_ips=networks))
    else:
        mesh.put(SCHEMA.peer("x"), peer_doc("x", allowed_ips=networks))
    assert mesh.reasons() == {"forbidden_network"}
    mesh.assert_honest_intact()


@pytest.mark.parametrize(
    ("networks", "reason"),
    [
        (["192.168.240.0/24"], "unsafe_route"),  # this node's underlay
        (["192.168.240.1/32"], "unsafe_route"),  # etcd
        (["192.168.0.0/16"], "unsafe_route"),  # covering both
        (["10.96.0.0/16"], "network_not_owned"),  # the overlay itself
        (["10.96.0.10/32"], "address_taken"),  # a live node's address
        (["10.96.0.0/32"], "network_not_owned"),  # the overlay's network address
        (["10.244.0.0/24"], "network_not_owned"),  # pods
    ],
)
def test_external_peers_may_not_route_the_underlay_etcd_or_the_mesh_itself(networks: list[str], reason: str) -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.peer("x"), peer_doc("x", allowed_ips=networks))
    assert mesh.reasons() == {reason}
    mesh.assert_honest_intact()


@pytest.mark.parametrize(
    "networks",
    [
        ["10.96.0.99/32", "10.96.0.99/32"],
        ["172.20.0.0/16", "172.20.1.0/24"],
        ["fd00::/64", "fd00::1/128"],
    ],
)
@pytest.mark.parametrize("kind", ["node", "peer"])
def test_networks_listed_twice_or_overlapping_each_other_are_refused(networks: list[str], kind: str) -> None:
    # Found by the long fuzz run: a network listed twice was claimed twice by the fold and released twice.
    mesh = Mesh()
    if kind == "node":
        mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.98", "192.0.2.9:1", allowed_ips=networks))
    else:
        mesh.put(SCHEMA.peer("x"), peer_doc("x", allowed_ips=networks))
    mesh.delete(SCHEMA.peer("x"))
    mesh.put(SCHEMA.peer("x"), peer_doc("x", allowed_ips=networks))
    assert {r.reason for r in mesh.rejections} == {"invalid_cidr"}
    mesh.assert_honest_intact()


def test_a_node_listing_its_own_overlay_address_again_is_refused() -> None:
    # Found by the fuzz test in CI: the address was claimed twice by the fold and released twice (a KeyError that
    # would have ended the reconciler). This is the sequence it found, through the agent's incremental fold.
    mesh = Mesh()
    builder = TopologyBuilder(LOCAL, auto_mtu=1420)
    builder.update(mesh.view, mesh.take_changes())
    doc = node_doc("a0", ATTACKER_KEY, "10.96.0.50", "192.0.2.9:51820", allowed_ips=["10.96.0.50/32"])
    mesh.put(SCHEMA.node("a0"), doc)
    builder.update(mesh.view, mesh.take_changes())
    mesh.delete(SCHEMA.node("a0"))
    builder.update(mesh.view, mesh.take_changes())
    assert [r.reason for r in mesh.rejections] == ["invalid_cidr"]
    assert builder.topology() == mesh.topology()
    mesh.assert_honest_intact()


def test_an_external_peer_routes_a_remote_site_and_its_own_overlay_address() -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.peer("site"), peer_doc("site", allowed_ips=["10.96.250.1/32", "172.20.0.0/16"]))
    assert not mesh.reasons()
    assert mesh.topology().peers[ATTACKER_KEY].allowed_ips == ("10.96.250.1/32", "172.20.0.0/16")


@pytest.mark.parametrize(
    ("networks", "claimed_by", "reason"),
    [
        (["10.244.7.0/24"], "x", None),  # a pod subnet it claims: fine
        (["10.244.7.0/24"], None, "network_not_owned"),  # one nobody claimed
        (["10.244.7.0/24"], "h9", "address_taken"),  # another node's subnet
        # h1 holds 10.244.1.0/24 already: a second subnet claim of its takes nothing, so nobody holds this one
        (["10.244.7.0/24"], "h1", "network_not_owned"),
        (["10.244.7.0/25"], "x", "network_not_owned"),  # not a node subnet (/24 by default)
        (["10.244.0.0/16"], "x", "network_not_owned"),  # the whole pod network
        (["10.96.0.99/32"], None, "network_not_owned"),  # another overlay address
        (["10.97.0.0/24"], None, "network_not_owned"),  # outside the pod network
        (["0.0.0.0/0"], None, "forbidden_network"),
    ],
)
def test_nodes_may_claim_their_address_and_their_claimed_pod_subnet_only(
    networks: list[str], claimed_by: str | None, reason: str | None
) -> None:
    mesh = Mesh()
    if claimed_by is not None:
        mesh.put(SCHEMA.claim(claimed_by, networks[0], "pods"), b"")
    mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.98", "192.0.2.9:1", allowed_ips=networks))
    assert mesh.reasons() - {"surplus_claim"} == ({reason} if reason else set())
    if reason is None:
        assert networks[0] in mesh.topology().peers[ATTACKER_KEY].allowed_ips
    else:
        assert ATTACKER_KEY not in mesh.topology().peers
    mesh.assert_honest_intact()


def test_a_younger_claim_on_a_nodes_pod_subnet_takes_nothing_from_it() -> None:
    mesh = Mesh()
    key, _, _ = HONEST["h1"]
    assert "10.244.1.0/24" in mesh.topology().peers[key].allowed_ips
    mesh.put(SCHEMA.claim("x", "10.244.1.0/24", "pods"), b"")  # younger
    mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.98", "192.0.2.9:1", allowed_ips=["10.244.1.0/24"]))
    topology = mesh.topology()
    assert "10.244.1.0/24" in topology.peers[key].allowed_ips and ATTACKER_KEY not in topology.peers
    assert mesh.reasons() == {"address_taken"}
    mesh.assert_honest_intact()


def test_a_node_record_with_more_networks_than_any_node_has_is_too_large() -> None:
    mesh = Mesh()
    many = [f"10.244.{i}.0/24" for i in range(65)]
    mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.98", "192.0.2.9:1", allowed_ips=many))
    huge = [f"10.244.{i // 256}.{i % 256}/32" for i in range(20_000)]
    mesh.put(SCHEMA.node("y"), node_doc("y", ATTACKER_KEY, "10.96.0.97", "192.0.2.9:1", allowed_ips=huge))
    assert mesh.reasons() == {"too_large"}
    mesh.assert_honest_intact()


# --- endpoints that are no remote WireGuard peer --------------------------------------------------------------------

BAD_ENDPOINTS = [
    "127.0.0.1:22",
    "0.0.0.0:51820",
    "[::]:51820",
    "[::1]:51820",
    "255.255.255.255:51820",
    "224.0.0.1:51820",
    "[ff02::1]:51820",
    "[::ffff:127.0.0.1]:51820",
    "[::ffff:192.0.2.1]:51820",
    "169.254.169.254:80",
    "[fe80::1%eth0]:51820",
    "[fe80::1]:51820",
    "192.0.2.1:0",
    "192.0.2.1:65536",
    "192.0.2.1:-1",
    "192.0.2.1:+80",
    "192.0.2.1: 80",
    "192.0.2.1",
    "example.org:51820",
    "",
]


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
@pytest.mark.parametrize("kind", ["node", "peer"])
def test_endpoints_that_are_no_remote_peer_are_refused(endpoint: str, kind: str) -> None:
    mesh = Mesh()
    if kind == "node":
        mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.99", endpoint))
    elif endpoint:  # an external peer without an endpoint is one that dials us
        mesh.put(SCHEMA.peer("x"), peer_doc("x", endpoint=endpoint))
    else:
        return
    assert mesh.reasons() == {"invalid_endpoint"}
    mesh.assert_honest_intact()


def test_a_node_whose_endpoint_lies_inside_the_mesh_is_left_out() -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, "10.96.0.99", "10.96.0.10:51820"))
    assert mesh.reasons() == {"unsafe_route"}
    mesh.assert_honest_intact()


# --- keys --------------------------------------------------------------------------------------------------------

# X25519 ignores the top bit, so each point has a twin with it set.
LOW_ORDER = sorted(LOW_ORDER_POINTS) + [p[:31] + bytes([p[31] | 0x80]) for p in sorted(LOW_ORDER_POINTS)]


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p.hex()[:8] + p.hex()[-2:])
def test_low_order_public_keys_are_refused(point: bytes) -> None:
    # Proof that the listed point is of small order: OpenSSL refuses the all-zero shared secret it gives.
    with pytest.raises(ValueError, match="shared key"):
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(point))
    mesh = Mesh()
    text = base64.b64encode(point).decode()
    mesh.put(SCHEMA.node("x"), node_doc("x", text, "10.96.0.99", "192.0.2.9:1"))
    mesh.put(SCHEMA.peer("y"), peer_doc("y", public_key=text))
    assert {r.reason for r in mesh.rejections} == {"invalid_public_key"} and len(mesh.rejections) == 2
    mesh.assert_honest_intact()


@pytest.mark.parametrize("key", ["", "A" * 43 + "=", "A" * 44 + "==", " " + LOCAL_KEY[1:], LOCAL_KEY[:-1] + "\u00b2"])
def test_malformed_public_keys_are_refused(key: str) -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.node("x"), node_doc("x", key, "10.96.0.99", "192.0.2.9:1"))
    assert {r.reason for r in mesh.rejections} == {"invalid_public_key"}


# --- node addresses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.96.0.0", "address_outside_cidr"),  # the overlay's network address
        ("10.96.255.255", "address_outside_cidr"),  # its broadcast address
        ("10.97.0.1", "address_outside_cidr"),
        ("fd00::1", "address_outside_cidr"),
        ("127.0.0.1", "invalid_cidr"),
        ("fe80::1%eth0", "invalid_cidr"),
    ],
)
def test_node_addresses_must_be_usable_addresses_of_the_overlay(address: str, reason: str) -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.node("x"), node_doc("x", ATTACKER_KEY, address, "192.0.2.9:1"))
    assert mesh.reasons() == {reason}
    mesh.assert_honest_intact()


# --- the mesh config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr", ["0.0.0.0/0", "::/0", "10.0.0.0/7", "127.0.0.0/8", "224.0.0.0/24", "10.96.0.0/31", "10.244.0.0/16"]
)
def test_configs_with_overlay_networks_no_mesh_can_use_are_refused(cidr: str) -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.config, MeshConfig().to_json() | {"overlay_cidr": cidr})
    assert [r.reason for r in mesh.rejections] == ["invalid_config"]
    assert mesh.view.config == MeshConfig()
    mesh.assert_honest_intact()


@pytest.mark.parametrize(
    "changes",
    [
        {"overlay_cidr": "10.97.0.0/16"},  # excludes every node
        {"overlay_cidr": "fd00:96::/64"},  # the other family
        {"overlay_cidr": "10.96.0.0/29"},  # narrowed below two nodes' addresses
        {"overlay_cidr": "192.168.240.0/24"},  # every node's endpoint inside the mesh
        {"pod_cidr": "10.245.0.0/16", "_pods": True},  # a node's pod network outside the new one
    ],
)
def test_a_config_that_would_leave_registered_nodes_out_is_refused_until_they_leave(changes: dict[str, object]) -> None:
    mesh = Mesh()
    if changes.pop("_pods", False):
        key, address, endpoint = HONEST["h0"]
        mesh.put(SCHEMA.node("h0"), node_doc("h0", key, address, f"{endpoint}:51820", allowed_ips=["10.244.0.0/24"]))
    before = mesh.view.config
    mesh.put(SCHEMA.config, MeshConfig().to_json() | changes)
    assert [r.reason for r in mesh.rejections] == ["invalid_config"]
    assert "registered node" in mesh.rejections[0].message
    assert mesh.view.config == before
    mesh.assert_honest_intact()
    for name in HONEST:
        mesh.delete(SCHEMA.node(name))
    # Nobody left outside: the stored config takes effect by itself.
    assert str(mesh.view.config.overlay_cidrs[0]) == changes.get("overlay_cidr", "10.96.0.0/16")
    assert not mesh.view.rejected_by_reason()


def test_a_config_widening_the_overlay_takes_effect_at_once() -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.config, MeshConfig().to_json() | {"overlay_cidr": "10.96.0.0/12", "mtu": "1400"})
    assert not mesh.rejections
    assert str(mesh.view.config.overlay_cidrs[0]) == "10.96.0.0/12" and mesh.view.config.mtu == 1400
    mesh.assert_honest_intact()


def test_a_snapshot_judges_the_config_against_the_nodes_it_holds() -> None:
    view = MeshView(SCHEMA)
    key, address, endpoint = HONEST["h0"]
    items = (
        KeyValue(SCHEMA.config, encode_json(MeshConfig().to_json() | {"overlay_cidr": "10.97.0.0/16"}), 1, 1),
        KeyValue(SCHEMA.node("h0"), encode_json(node_doc("h0", key, address, f"{endpoint}:51820")), 2, 2),
    )
    view.apply(Snapshot(items, 2))
    assert view.config == MeshConfig() and view.rejected_by_reason() == {"invalid_config": 1}


@pytest.mark.parametrize(
    "doc",
    [
        {"schema": 1, "mtu": "\u00b2"},
        {"schema": 1, "mtu": "١٤٠٠"},  # Arabic-Indic digits
        {"schema": 1, "mtu": 1400.5},
        {"schema": 1, "mtu": True},
        {"schema": 1, "listen_port": "51820"},
        {"schema": 1, "lease_ttl_seconds": 10**30},
        {"schema": 1.0},
        {"schema": "1"},
        {"schema": 1, "overlay_cidr": ["10.96.0.0/16"]},
        {"schema": 1, "pod_cidr": "10.96.128.0/17"},  # overlaps the overlay
    ],
)
def test_config_fields_must_have_their_exact_types(doc: dict[str, object]) -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.config, doc)
    assert [r.reason for r in mesh.rejections] == ["invalid_config"]
    assert mesh.view.config == MeshConfig()


# --- takeovers through the reservations ---------------------------------------------------------------------------


def test_a_younger_claim_on_a_nodes_address_takes_nothing_from_it() -> None:
    mesh = Mesh()
    _, address, _ = HONEST["h1"]
    mesh.put(SCHEMA.claim("evil", address), b"")
    assert mesh.view.reservations[address].owner == "h1"
    mesh.assert_honest_intact()
    # Deleted and claimed again by another (an admin's mistake, or a migration gone wrong): h1's record is older
    # than the new claim, and h1 claims the address itself, so it keeps it.
    mesh.delete(SCHEMA.claim("h1", address))
    assert mesh.view.reservations[address].owner == "evil"
    mesh.assert_honest_intact()


def test_a_reservation_of_the_old_schema_counts_like_a_claim_until_migrated() -> None:
    mesh = Mesh()
    newcomer = NodeKey.generate().public_key
    mesh.put(SCHEMA.legacy_reservation("10.96.0.77"), b"old-node")
    mesh.put(SCHEMA.claim("newcomer", "10.96.0.77"), b"")  # younger: the old reservation holds the address
    mesh.put(SCHEMA.node("newcomer"), node_doc("newcomer", newcomer, "10.96.0.77", "192.168.240.77:51820"))
    assert mesh.view.reservations["10.96.0.77"].owner == "old-node"
    assert mesh.reasons() == {"address_taken"}
    mesh.assert_honest_intact()


def test_a_sleeper_claiming_a_nodes_address_stays_out_when_the_node_crashes_and_returns() -> None:
    mesh = Mesh()
    key, address, endpoint = HONEST["h1"]
    mesh.put(SCHEMA.peer("sleeper"), peer_doc("sleeper", allowed_ips=[f"{address}/32"]))
    assert mesh.reasons() == {"address_taken"}
    mesh.delete(SCHEMA.node("h1"))  # crashed: its lease expired; its reservation stays
    assert ATTACKER_KEY not in mesh.topology().peers, "the sleeper took the address of a node that is away"
    mesh.put(SCHEMA.node("h1"), node_doc("h1", key, address, f"{endpoint}:51820"))  # back, with a newer record
    mesh.assert_honest_intact()
    assert ATTACKER_KEY not in mesh.topology().peers


def test_a_squatter_on_the_address_a_future_node_will_pick_loses_it_when_the_node_reserves_it() -> None:
    mesh = Mesh()
    mesh.put(SCHEMA.node("squatter"), node_doc("squatter", ATTACKER_KEY, "10.96.0.77", "192.0.2.9:1"))
    mesh.put(SCHEMA.peer("squatter2"), peer_doc("squatter2", public_key=LOCAL_KEY[:-4] + "AAA=", allowed_ips=[]))
    newcomer = NodeKey.generate().public_key
    mesh.put(SCHEMA.claim("newcomer", "10.96.0.77"), b"")
    mesh.put(SCHEMA.node("newcomer"), node_doc("newcomer", newcomer, "10.96.0.77", "192.168.240.77:51820"))
    topology = mesh.topology()
    assert topology.names.get(newcomer) == "newcomer"
    assert ATTACKER_KEY not in topology.peers
    mesh.assert_honest_intact()


def test_malformed_claims_are_rejected_alone_and_keep_the_holder() -> None:
    mesh = Mesh()
    _, address, _ = HONEST["h2"]
    mesh.put(SCHEMA.legacy_reservation(address), b"\xff not a name")
    mesh.put(f"{SCHEMA.claims_of('a0')}overlay/not-an-address", b"")
    mesh.put(f"{SCHEMA.claims}Not_A_Name/overlay/{address}", b"")
    mesh.put(f"{SCHEMA.claims}a0", b"")
    mesh.put(f"{SCHEMA.claims_of('a0')}pods/10.244.0.1-24", b"")  # host bits set
    mesh.put(f"{SCHEMA.claims_of('a0')}pods/10.244.0.0_24", b"")
    mesh.put(f"{SCHEMA.claims_of('a0')}later/10.244.0.0-24", b"")  # a kind of a later version: ignored
    reasons = [r.reason for r in mesh.rejections]
    assert reasons == ["invalid_field", "invalid_key", "invalid_key", "invalid_key", "invalid_key", "invalid_key"]
    assert mesh.view.reservations[address].owner == "h2"
    mesh.assert_honest_intact()


def test_decode_json_bounds() -> None:
    assert decode_json(json.dumps({"a": [[1]]}).encode()) == {"a": [[1]]}
    assert decode_json(b'{"a":"' + b"[" * 100 + b'"}') == {"a": "[" * 100}
    for raw in (b"[" * 5 + b"]" * 5, b"x" * (MAX_VALUE_BYTES + 1)):
        with pytest.raises(ValueError, match=r"deeper|larger"):
            decode_json(raw)
