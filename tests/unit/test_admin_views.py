"""The admin tools' reading of the mesh on the memory store: `status` (with the records refused) and `showconf`
(what a node's device should hold, what an external member's wg-quick file says)."""

from __future__ import annotations

import pytest

from helpers import run
from unit.stage_parts import SCHEMA, publish, record
from warren_mesh.admin import showconf
from warren_mesh.admin.reading import read_view
from warren_mesh.admin.status import read_status, render_json, render_table
from warren_mesh.identity.keys import NodeKey
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.records import ExternalPeer, encode_json


def test_status_lists_the_nodes_with_their_leases_and_the_records_refused() -> None:
    async def body() -> None:
        store = MemoryStore()
        await publish(store, record("n1", 1))
        lease = await store.grant_lease(10)
        node = record("n2", 2)
        await store.put(SCHEMA.node("n2"), encode_json(node.to_json()), lease=lease)
        await store.put(SCHEMA.node("bad"), b"{not json")
        status = await read_status(store, SCHEMA)
        assert [n.name for n in status.nodes] == ["n1", "n2"]
        assert [n.lease_seconds_left for n in status.nodes] == [-1, 10]
        assert [(r.key, r.reason) for r in status.rejected] == [(SCHEMA.node("bad"), "invalid_json")]
        table = render_table(status)
        assert "n1" in table and "10.96.0.12" in table and "invalid_json" in table
        assert '"name": "n2"' in render_json(status)

    run(body())


def test_showconf_gives_a_nodes_device_and_an_external_members_file() -> None:
    async def body() -> None:
        store = MemoryStore()
        for i in (1, 2):
            await publish(store, record(f"n{i}", i))
        laptop_key = NodeKey.generate()
        laptop = ExternalPeer.from_json(
            {"schema": 1, "name": "laptop", "public_key": laptop_key.public_key, "allowed_ips": ["10.96.200.1/32"]},
            key_name="laptop",
        )
        await store.put(SCHEMA.peer("laptop"), encode_json(laptop.to_json()))
        view = await read_view(store, SCHEMA)
        node = showconf.for_node(view, "n1")
        assert node.addresses == ("10.96.0.11/16",) and node.listen_port == 51820
        assert sorted(node.names[p.public_key] for p in node.peers) == ["laptop", "n2"]
        member = showconf.for_peer(view, "laptop", private_key=laptop_key)
        text = member.render()
        assert f"PrivateKey = {laptop_key.private_base64()}" in text and "Address = 10.96.200.1/32" in text
        assert sorted(member.names[p.public_key] for p in member.peers) == ["n1", "n2"]
        with pytest.raises(showconf.ShowconfError, match="not laptop's"):
            showconf.for_peer(view, "laptop", private_key=NodeKey.generate())
        with pytest.raises(showconf.ShowconfError, match="no node"):
            showconf.for_node(view, "ghost")

    run(body())
