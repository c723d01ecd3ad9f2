"""External members without Kubernetes: `warren-mesh peer add|remove` and `warren-mesh showconf`, against a real
etcd and agents (the wg-quick file brought up for real: tests/dataplane/test_lab.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

from integration.agents import Mesh, in_mesh
from warren_mesh.identity.keys import NodeKey
from warren_mesh.testkit.etcd_server import EtcdServer
from warren_mesh.testkit.waiting import wait_until
from warren_mesh.values.keyspace import KeySchema


def _cli(etcd: EtcdServer, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warren_mesh.cli", *args, *etcd.client_flags(), f"--prefix={prefix}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _conf(text: str) -> list[dict[str, str]]:
    """A wg-quick file as sections of key = value (comments dropped)."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            sections.append({"section": line})
        elif "=" in line:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
    return sections


def test_a_member_gets_a_key_an_address_and_a_peer_per_node(
    shared_etcd: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    schema = KeySchema(prefix)

    async def scenario(mesh: Mesh) -> None:
        admin = shared_etcd.admin_store()
        try:
            mesh.start("a")
            mesh.start("b")
            await mesh.converged()
            added = await asyncio.to_thread(
                _cli, shared_etcd, prefix, "peer", "add", "laptop", "--allowed-ip", "192.168.77.0/24"
            )
            assert added.returncode == 0, added.stderr
            interface, *peers = _conf(added.stdout)
            key = NodeKey.from_private_bytes(base64.b64decode(interface["PrivateKey"]))
            address = interface["Address"].split("/")[0]
            record = json.loads((await admin.get(schema.peer("laptop"))).value)  # type: ignore[union-attr]
            # The private key is in the file only: etcd has the public one, the address and the network behind it.
            assert record["public_key"] == key.public_key and interface["PrivateKey"] not in json.dumps(record)
            assert record["allowed_ips"] == [f"{address}/32", "192.168.77.0/24"]
            assert await admin.get(schema.claim("laptop", address)) is not None
            # One [Peer] per node, with what that node routes, dialled at its endpoint, kept open from behind NAT.
            nodes = mesh.agents["a"].view.nodes
            assert {p["PublicKey"] for p in peers} == {e.record.public_key for e in nodes.values()}
            for peer in peers:
                node = next(e.record for e in nodes.values() if e.record.public_key == peer["PublicKey"])
                assert peer["Endpoint"] == str(node.endpoint)
                assert set(peer["AllowedIPs"].split(", ")) == {f"{node.overlay_ip}/32", *map(str, node.allowed_ips)}
                assert peer["PersistentKeepalive"] == "25"
            # Every agent takes the member as a peer.
            await wait_until(
                lambda: all(key.public_key in agent.backend.read().peers for agent in mesh.agents.values()),
                10,
                "the agents to take the member",
            )

            # showconf gives the same file again, without the key unless it is given; as JSON too.
            key_file = tmp_path / "laptop.key"
            key_file.write_text(key.private_base64())
            key_file.chmod(0o600)
            again = await asyncio.to_thread(
                _cli, shared_etcd, prefix, "showconf", "peer", "laptop", "--private-key-file", str(key_file)
            )
            assert again.returncode == 0 and _conf(again.stdout) == _conf(added.stdout), again.stderr
            bare = await asyncio.to_thread(_cli, shared_etcd, prefix, "showconf", "peer", "laptop", "--output", "json")
            shown = json.loads(bare.stdout)
            assert not shown["interface"]["private_key_included"] and interface["PrivateKey"] not in bare.stdout
            assert {p["name"] for p in shown["peers"]} == {"a", "b"}
            wrong = tmp_path / "other.key"
            wrong.write_text(NodeKey.generate().private_base64())
            wrong.chmod(0o600)
            refused = await asyncio.to_thread(
                _cli, shared_etcd, prefix, "showconf", "peer", "laptop", "--private-key-file", str(wrong)
            )
            assert refused.returncode == 1 and "not laptop's" in refused.stderr

            # showconf node: what a node's device holds, peer for peer.
            node_conf = await asyncio.to_thread(_cli, shared_etcd, prefix, "showconf", "node", "a", "--output", "json")
            expected = json.loads(node_conf.stdout)
            device = mesh.agents["a"].backend.read()
            assert {p["public_key"]: tuple(p["allowed_ips"]) for p in expected["peers"]} == {
                k: p.allowed_ips for k, p in device.peers.items()
            }

            # A node joining later never takes the member's address; names are not shared with nodes.
            mesh.start("c")
            await mesh.converged()
            assert str(mesh.agents["c"].view.nodes["c"].record.overlay_ip) != address
            taken = await asyncio.to_thread(_cli, shared_etcd, prefix, "peer", "add", "a")
            assert taken.returncode == 1 and "is a node" in taken.stderr
            twice = await asyncio.to_thread(_cli, shared_etcd, prefix, "peer", "add", "laptop")
            assert twice.returncode == 1 and "exists already" in twice.stderr
            missing = await asyncio.to_thread(_cli, shared_etcd, prefix, "showconf", "peer", "nobody")
            assert missing.returncode == 1 and "no external peer 'nobody'" in missing.stderr

            # Removed: the record and its claim go, and every node drops the peer.
            removed = await asyncio.to_thread(_cli, shared_etcd, prefix, "peer", "remove", "laptop")
            assert removed.returncode == 0, removed.stderr
            assert await admin.get(schema.peer("laptop")) is None
            assert await admin.get(schema.claim("laptop", address)) is None
            await wait_until(
                lambda: all(key.public_key not in agent.backend.read().peers for agent in mesh.agents.values()),
                10,
                "the agents to drop the member",
            )
        finally:
            await admin.close()

    in_mesh(shared_etcd, prefix, tmp_path, scenario)
