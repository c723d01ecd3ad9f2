"""Decoding records: every way a record can be wrong maps to one reason; valid ones round-trip."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Callable

import pytest

from warren_mesh.identity.keys import NodeKey
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.endpoint import Endpoint
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import ExternalPeer, MeshConfig, NodeRecord, encode_json
from warren_mesh.values.netaddr import ip_text, network_text, parse_ip, parse_network
from warren_mesh.values.routes import Routes

KEY = base64.b64encode(bytes(range(32))).decode()


def node_doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema": 1,
        "name": "node-a",
        "public_key": KEY,
        "endpoint": "192.0.2.1:51820",
        "overlay_ip": "10.96.0.2",
        "allowed_ips": ["10.244.1.0/24"],
        "listen_port": 51820,
        "published_at": 1.5,
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def decode_node(doc: object, name: str = "node-a") -> NodeRecord:
    return NodeRecord.from_json(decode_json(json.dumps(doc).encode()), key_name=name)


def test_node_record_round_trips() -> None:
    record = decode_node(node_doc())
    assert record.endpoint == Endpoint(ipaddress.ip_address("192.0.2.1"), 51820)
    assert record.routes.text == ("10.244.1.0/24", "10.96.0.2/32")
    assert record.routes == Routes.of(record.allowed_ips, hosts=(record.overlay_ip,))
    assert NodeRecord.from_json(decode_json(encode_json(record.to_json())), key_name="node-a") == record


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (json.dumps(node_doc(schema=2)).encode(), "schema_version"),
        (json.dumps([1, 2]).encode(), "invalid_field"),
        (json.dumps(node_doc(public_key="c2hvcnQ=")).encode(), "invalid_public_key"),
        (json.dumps(node_doc(public_key="not base64 at all!")).encode(), "invalid_public_key"),
        (json.dumps(node_doc(endpoint="example.com:51820")).encode(), "invalid_endpoint"),
        (json.dumps(node_doc(endpoint="192.0.2.1:99999")).encode(), "invalid_endpoint"),
        (json.dumps(node_doc(endpoint="192.0.2.1")).encode(), "invalid_endpoint"),
        (json.dumps(node_doc(allowed_ips=["10.0.0.0/33"])).encode(), "invalid_cidr"),
        (json.dumps(node_doc(allowed_ips=["10.0.0.1/24"])).encode(), "invalid_cidr"),
        (json.dumps(node_doc(overlay_ip="10.96.0.300")).encode(), "invalid_cidr"),
        (json.dumps(node_doc(name="node-b")).encode(), "name_mismatch"),
        (json.dumps(node_doc(listen_port=0)).encode(), "invalid_field"),
        (json.dumps(node_doc(name=None)).encode(), "invalid_field"),
    ],
)
def test_bad_node_records_are_rejected_with_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        NodeRecord.from_json(decode_json(raw), key_name="node-a")
    assert caught.value.reason == reason
    assert "\n" not in str(caught.value)


def test_ipv6_endpoint() -> None:
    endpoint = Endpoint.parse("[2001:db8::1]:51820")
    assert str(endpoint) == "[2001:db8::1]:51820"
    assert Endpoint.parse("2001:db8::1", default_port=7).port == 7


def test_mesh_config_defaults_and_validation() -> None:
    assert MeshConfig.from_json({"schema": 1}) == MeshConfig()
    config = MeshConfig.from_json({"schema": 1, "overlay_cidr": "10.200.0.0/24", "mtu": 1380, "lease_ttl_seconds": 5})
    assert (str(config.overlay_cidrs[0]), config.mtu, config.lease_ttl_seconds) == ("10.200.0.0/24", 1380, 5)
    assert MeshConfig.from_json(config.to_json()) == config
    for bad in ({"mtu": 100}, {"listen_port": 70000}, {"lease_ttl_seconds": 1}, {"overlay_cidr": "10.0.0.0/31"}):
        with pytest.raises(RecordError):
            MeshConfig.from_json({"schema": 1, **bad})


def test_key_rotation_fields() -> None:
    config = MeshConfig.from_json({"schema": 1, "key_rotation_interval_hours": 24})
    assert config.key_rotation_interval_hours == 24 and MeshConfig.from_json(config.to_json()) == config
    for bad in (-1, 10**6, "24", 1.5):
        with pytest.raises(RecordError):
            MeshConfig.from_json({"schema": 1, "key_rotation_interval_hours": bad})
    other = NodeKey.generate().public_key
    doc = {
        "schema": 1,
        "name": "a",
        "public_key": KEY,
        "endpoint": "192.0.2.1:51820",
        "overlay_ip": "10.96.0.2",
        "listen_port": 51820,
        "next_public_key": other,
    }
    record = NodeRecord.from_json(doc, key_name="a")
    assert record.public_keys == (KEY, other) and NodeRecord.from_json(record.to_json(), key_name="a") == record
    for bad_key in (KEY, "not a key", 7):
        with pytest.raises(RecordError):
            NodeRecord.from_json({**doc, "next_public_key": bad_key}, key_name="a")
    assert "next_public_key" not in NodeRecord.from_json({**doc, "next_public_key": None}, key_name="a").to_json()


def test_external_peer_needs_allowed_ips() -> None:
    peer = ExternalPeer.from_json(
        {"schema": 1, "name": "laptop", "public_key": KEY, "allowed_ips": ["10.97.0.1/32"]}, key_name="laptop"
    )
    assert peer.endpoint is None and peer.persistent_keepalive is None
    with pytest.raises(RecordError) as caught:
        ExternalPeer.from_json({"schema": 1, "name": "laptop", "public_key": KEY, "allowed_ips": []}, key_name="laptop")
    assert caught.value.reason == "invalid_cidr"


def test_a_host_route_made_from_the_address_equals_one_parsed_as_a_network() -> None:
    for text in ("10.96.0.7", "fd00:0:0::1", "::ffff:1.2.3.4"):
        address = ipaddress.ip_address(text)
        extra = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/64"))
        assert Routes.of(extra, hosts=(address,)) == Routes.of(
            (*extra, ipaddress.ip_network(f"{text}/{address.max_prefixlen}"))
        )


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1", "0.0.0.0", "255.255.255.255", "256.0.0.1", "010.0.0.1", "10.0.0", "10.0.0.1.", " 10.0.0.1",
     "10.0.0.1 ", "1e1.0.0.1", "", "::1", "fd00::1", "::ffff:10.0.0.1", "0x0a.0.0.1", "10.0.0.1/32", "fd00:::1"],
)  # fmt: skip
def test_parse_ip_agrees_with_the_standard_library(text: str) -> None:
    _agree(parse_ip, ipaddress.ip_address, text)


def _agree(parse: Callable[[str], object], reference: Callable[[str], object], text: str) -> None:
    """``parse`` gives what the standard library's parser gives for ``text``, or raises ValueError as it does."""
    outcomes: list[object] = []
    for parser in (parse, reference):
        try:
            outcomes.append(parser(text))
        except ValueError:
            outcomes.append(ValueError)
    got, expected = outcomes
    assert got == expected and type(got) is type(expected) and str(got) == str(expected)


@pytest.mark.parametrize(
    "text",
    ["10.128.4.0/24", "10.128.4.1/24", "10.0.0.0/8", "0.0.0.0/0", "10.0.0.1/32", "10.0.0.0/33", "10.0.0.0/024",
     "10.0.0.0/00", "10.0.0.0/", "10.0.0.0", "010.0.0.0/8", "10.0.0.0/255.0.0.0", "10.0.0.0/0.255.255.255",
     "10.0.0.0/+8", "10.0.0.0/٨", "10.0.0.0/8 ", " 10.0.0.0/8", "fd00::/64", "fd00::1/64", "::ffff:10.0.0.0/104",
     "1e1.0.0.0/8", "", "/8", "10.0.0.0/8/8"],
)  # fmt: skip
def test_parse_network_agrees_with_the_standard_library(text: str) -> None:
    _agree(parse_network, ipaddress.ip_network, text)


@pytest.mark.parametrize(
    "text", ["0.0.0.0", "10.96.0.1", "255.255.255.255", "192.0.2.10", "::1", "fd00::1", "::ffff:10.0.0.1"]
)
def test_the_fast_texts_are_the_standard_librarys(text: str) -> None:
    address = ipaddress.ip_address(text)
    assert ip_text(address) == str(address)
    for length in (0, 8, 24, address.max_prefixlen):
        network = ipaddress.ip_network(f"{text}/{length}", strict=False)
        assert network_text(network) == str(network)
