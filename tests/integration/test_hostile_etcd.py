"""Hostile writes through a real etcd to three running agents: each class is rejected or left out alone, counted
under its reason, and no agent ends, loses a valid peer or puts anything dangerous on its device.

The unit tests (tests/unit/test_hostile_records.py) cover every variant of every class against the pure code;
this test sends one of each class the whole way: etcd, the wire decoder, the watch, the view, the fold, the device.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from pathlib import Path

import hostile
from integration.agents import Mesh, in_mesh
from warren_mesh.identity.keys import NodeKey
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.trust.networks import network_problem
from warren_mesh.trust.records import MeshConfig, encode_json
from warren_mesh.values.keyspace import KeySchema

NAMES = ("n0", "n1", "n2")


def node_doc(name: str, key: str, address: str, **changes: object) -> dict[str, object]:
    return hostile.node_doc(name, key, address, "198.51.100.7:51820") | changes


def peer_doc(name: str, **changes: object) -> dict[str, object]:
    return hostile.peer_doc(name, **({"public_key": NodeKey.generate().public_key} | changes))


def _devices(mesh: Mesh) -> dict[str, object]:
    return {n: (sorted(mesh.peer_names(n)), len(mesh.device(n).peers), mesh.ended()) for n in NAMES}


def intact(mesh: Mesh) -> bool:
    """Every agent runs and holds exactly the other honest nodes, with nothing dangerous routed."""
    for name in NAMES:
        if mesh.peer_names(name) != set(NAMES) - {name} or len(mesh.device(name).peers) != 2:
            return False
        for spec in mesh.device(name).peers.values():
            if any(network_problem(ipaddress.ip_network(n)) for n in spec.allowed_ips):
                return False
    return not mesh.ended()


def test_hostile_records_through_etcd_are_contained(shared_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    schema = KeySchema(prefix)
    attacker = NodeKey.generate().public_key
    low_order = base64.b64encode(bytes(32)).decode()
    # key -> (value, the reason every agent counts it under)
    hostile: dict[str, tuple[bytes, str]] = {
        schema.node("no-address"): (
            encode_json({k: v for k, v in node_doc("no-address", attacker, "").items() if k != "overlay_ip"}),
            "invalid_field",
        ),
        schema.node("long-port"): (b'{"schema":1,"listen_port":' + b"9" * 5000 + b"}", "invalid_json"),
        schema.node("digit"): (
            encode_json(node_doc("digit", attacker, "10.96.200.1", endpoint="203.0.113.5:\u00b2")),
            "invalid_endpoint",
        ),
        schema.node("deep"): (b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", "too_large"),
        schema.node("bad-key") + "\udcff": (b"{}", "invalid_key"),
        schema.root + "\udcc0\udc80": (b"{}", ""),  # not a key of ours at all: ignored, never an error
        schema.node("default-route"): (
            encode_json(node_doc("default-route", attacker, "10.96.200.2", allowed_ips=["0.0.0.0/1", "128.0.0.0/1"])),
            "forbidden_network",
        ),
        schema.node("loopback-endpoint"): (
            encode_json(node_doc("loopback-endpoint", attacker, "10.96.200.3", endpoint="127.0.0.1:22")),
            "invalid_endpoint",
        ),
        schema.node("low-order"): (encode_json(node_doc("low-order", low_order, "10.96.200.4")), "invalid_public_key"),
        schema.node("big"): (b'{"schema":1,"name":"' + b"x" * 1_000_000 + b'"}', "too_large"),
        schema.peer("metadata"): (
            encode_json(peer_doc("metadata", allowed_ips=["169.254.169.254/32"])),
            "forbidden_network",
        ),
        schema.peer("scoped"): (encode_json(peer_doc("scoped", endpoint="[fe80::1%eth0]:51820")), "invalid_endpoint"),
        schema.node("schema-true"): (
            encode_json(node_doc("schema-true", attacker, "10.96.200.5", schema=True)),
            "schema_version",
        ),
    }

    async def scenario(mesh: Mesh) -> None:
        for name in NAMES:
            mesh.start(name)
        await mesh.converged()
        writer = shared_etcd.admin_store()
        try:
            for key, (value, _) in hostile.items():
                await writer.put(key, value)
            # Conflicts the fold settles: claims on what the mesh gave others.
            n1 = mesh.agents["n0"].view.nodes["n1"].record
            await writer.put(
                schema.peer("sleeper"), encode_json(peer_doc("sleeper", allowed_ips=[f"{n1.overlay_ip}/32"]))
            )
            await writer.put(
                schema.node("pods"), encode_json(node_doc("pods", attacker, "10.96.200.9", allowed_ips=["10.1.0.0/16"]))
            )
            # A config that would empty the mesh, and one of no use at all.
            await writer.put(schema.config, encode_json(MeshConfig().to_json() | {"overlay_cidr": "10.97.0.0/16"}))
            await writer.put(schema.config, encode_json(MeshConfig().to_json() | {"overlay_cidr": "0.0.0.0/0"}))

            expected: dict[str, int] = {}
            for _, reason in hostile.values():
                if reason:
                    expected[reason] = expected.get(reason, 0) + 1
            expected["invalid_config"] = 2

            def counted(name: str) -> dict[str, float]:
                return {
                    reason: mesh.metric(name, "warren_mesh_rejected_records_total", {"reason": reason})
                    for reason in expected
                }

            try:
                await wait_until(lambda: all(counted(n) == expected for n in NAMES), 10, "every agent's counts")
            except AssertionError:
                raise AssertionError(f"expected {expected} everywhere, counted {[counted(n) for n in NAMES]}") from None
            for name in NAMES:
                for reason in ("address_taken", "network_not_owned"):
                    count = mesh.metric(name, "warren_mesh_conflicts_total", {"reason": reason})
                    assert count == 1, (name, reason, count)
            assert intact(mesh), f"a valid peer was lost or something dangerous routed: {_devices(mesh)}"
            assert all(str(mesh.agents[n].view.config.overlay_cidrs[0]) == "10.96.0.0/16" for n in NAMES)

            # Deleting n1's claim and claiming its address for another takes nothing from n1, and n1 claims its
            # address again.
            await writer.delete(schema.claim("n1", str(n1.overlay_ip)))
            await writer.put(schema.claim("evil", str(n1.overlay_ip)), b"")

            def restored() -> bool:
                claims = mesh.agents["n0"].view.claims_on(str(n1.overlay_ip))
                return {claim.owner for claim in claims} == {"evil", "n1"}

            await wait_until(restored, 10, "n1 to claim its address again")
            assert intact(mesh), f"the rewritten reservation cost a peer: {_devices(mesh)}"

            # Everything deleted: counts of what is wrong now drop to zero, the agents still react to valid changes.
            for key in [
                *hostile,
                schema.peer("sleeper"),
                schema.node("pods"),
                schema.config,
                schema.claim("evil", str(n1.overlay_ip)),
            ]:
                await writer.delete(key)
            mesh.start("n3")
            await mesh.converged()
            await asyncio.sleep(0.2)
            assert not mesh.ended()
            for name in NAMES:
                assert mesh.agents[name].view.rejected_by_reason() == {}
        finally:
            await writer.close()

    in_mesh(shared_etcd, prefix, tmp_path, scenario)
