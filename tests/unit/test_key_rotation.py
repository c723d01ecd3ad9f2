"""Key rotation on the memory store and device: announce, install, switch the device, publish; and what a
rotation request under rotate/<node> must say."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from helpers import run
from unit.stage_parts import SCHEMA
from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.device_writer import DeviceWriter
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.key_rotation import KeyRotation, rotation_request
from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.agent.registrar import Registrar
from warren_mesh.identity.keys import load, load_or_create
from warren_mesh.mesh.claims import LocalNode
from warren_mesh.mesh.decision import Decider
from warren_mesh.mesh.view import MeshView
from warren_mesh.metrics.instruments import AgentMetrics
from warren_mesh.settings import RegistrationSettings
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.decode import decode_json
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.records import MeshConfig, NodeRecord
from warren_mesh.values.watch import Events, Snapshot
from warren_mesh.wireguard.memory import MemoryBackend


def test_a_rotation_announces_installs_switches_and_publishes_the_new_key(tmp_path: Path) -> None:
    async def body() -> None:
        store = MemoryStore()
        key_file = tmp_path / "key"
        old, _ = load_or_create(key_file)
        identity = Identity(old)
        metrics = AgentMetrics(CollectorRegistry())
        settings = RegistrationSettings("n1", ("192.0.2.1",), 51820, 10, None)
        registrar = Registrar(
            settings,
            store=store,
            schema=SCHEMA,
            identity=identity,
            endpoint_hosts=(ipaddress.ip_address("192.0.2.1"),),
            metrics=metrics,
        )
        registration = await registrar.register(MeshConfig())
        view = MeshView(SCHEMA)
        device = MemoryBackend(interface_name="wgtest")
        local = LocalNode("n1", old.public_key, registration.record.overlay_ips)
        reconciler = Reconciler(
            view=view,
            decider=Decider(local, auto_mtu=1420),
            identity=identity,
            backend=device,
            writer=DeviceWriter(device, identity),
            device_thread=DeviceThread(inline=True),
            resync_interval=30.0,
            report=lambda _: None,
            on_device_unreadable=lambda: None,
        )
        reconciler.notify(view.apply(await store.list_prefix(SCHEMA.root)))
        await reconciler.reconcile_once()
        assert device.public_key == old.public_key
        # Watch our record while it rotates: first the announcement, then the switch.
        seen: list[NodeRecord] = []

        async def watch() -> None:
            async for result in store.observe(SCHEMA.node("n1")):
                values = [kv.value for kv in result.items] if isinstance(result, Snapshot) else []
                if isinstance(result, Events):
                    values = [event.kv.value for event in result.events if event.kind == "put"]
                seen.extend(NodeRecord.from_json(decode_json(value), key_name="n1") for value in values)

        watching = asyncio.create_task(watch())
        rotation = KeyRotation(
            key_file=key_file, publication=registrar.publication, reconciler=reconciler, metrics=metrics, grace=0
        )
        new = await rotation.rotate("asked")
        await asyncio.sleep(0.01)
        watching.cancel()
        assert new != old and identity.key == new and load(key_file) == new
        assert device.public_key == new.public_key
        assert [(r.public_key, r.next_public_key) for r in seen[1:]] == [
            (old.public_key, new.public_key),  # announced: peers add the new key, no allowed IPs yet
            (new.public_key, None),  # switched
        ]
        assert metrics.registry.get_sample_value("warren_mesh_key_rotations_total") == 1
        assert rotation.key_created_at() > 0
        await registrar.deregister()

    run(body())


def test_a_rotation_request_says_when_it_was_made() -> None:
    assert rotation_request(b'{"requested_at": 1700000000.5}') == 1700000000.5
    for bad in (b'{"requested_at": "soon"}', b'{"requested_at": true}', b"[]", b"{not json"):
        with pytest.raises(RecordError):
            rotation_request(bad)
