"""The decide stage (mesh/decision.py): when it needs the device as read, and the plans it makes from it or from
what the device was last given."""

from __future__ import annotations

import ipaddress

from unit.stage_parts import LOCAL, LOCAL_KEY, SCHEMA, record
from warren_mesh.agent.device_writer import DeviceWriter
from warren_mesh.agent.identity import Identity
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.decision import Decider
from warren_mesh.mesh.view import MeshView
from warren_mesh.trust.records import encode_json
from warren_mesh.values.device import DeviceState
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot
from warren_mesh.wireguard.memory import MemoryBackend


class _Mesh:
    """A view fed one revision at a time, each batch handed to the decider as the observe stage does."""

    def __init__(self, decider: Decider) -> None:
        self.view = MeshView(SCHEMA)
        self.decider = decider
        self.revision = 1
        self.decider.note(self.view.apply(Snapshot((), self.revision)))

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        batch = Events((Event("put", KeyValue(key, value, self.revision, self.revision)),), self.revision)
        self.decider.note(self.view.apply(batch))

    def delete(self, key: str) -> None:
        self.revision += 1
        batch = Events((Event("delete", KeyValue(key, b"", 0, self.revision)),), self.revision)
        self.decider.note(self.view.apply(batch))

    def join(self, index: int) -> str:
        node = record(f"n{index}", index)
        self.put(SCHEMA.claim(node.name, str(node.overlay_ip)), b"")
        self.put(SCHEMA.claim(node.name, str(node.allowed_ips[0]), "pods"), b"")
        self.put(SCHEMA.node(node.name), encode_json(node.to_json()))
        return node.public_key


def test_the_first_plan_is_made_against_the_device_then_deltas_from_what_it_was_given() -> None:
    decider = Decider(LOCAL, auto_mtu=1420)
    mesh = _Mesh(decider)
    first_key = mesh.join(1)
    fold = decider.fold(mesh.view)
    assert fold.needs_device and fold.published == {"n1": 1.0}
    first = decider.decide(DeviceState(None, None, {}), remove_unknown=True)
    kinds = [op.kind for op in first.plan.operations()]
    assert first.full and kinds[:3] == ["private_key", "interface", "set_peers"] and first.mtu == 1420
    assert first.names[first_key] == "n1"
    decider.settle(ok=True)
    # A join after a successful pass: a delta, the device not read, touching the newcomer alone.
    second_key = mesh.join(2)
    fold = decider.fold(mesh.view)
    assert not fold.needs_device
    delta = decider.decide(None, remove_unknown=True)
    assert not delta.full and [(c.action, c.public_key) for c in delta.plan.changes] == [("add", second_key)]
    assert [op.kind for op in delta.plan.operations()] == ["set_peers"]  # its /24 rides the pod network's route
    assert decider.peer_names == {first_key: "n1", second_key: "n2"}
    decider.settle(ok=True)
    # A leave: the peer goes, in a delta.
    mesh.delete(SCHEMA.node("n1"))
    assert not decider.fold(mesh.view).needs_device
    leave = decider.decide(None, remove_unknown=True)
    assert [(c.action, c.public_key) for c in leave.plan.changes] == [("remove", first_key)]
    assert first_key not in decider.peer_names


def test_a_failed_pass_a_resync_and_a_new_key_each_make_the_next_plan_look_at_the_device() -> None:
    decider = Decider(LOCAL, auto_mtu=1420)
    mesh = _Mesh(decider)
    mesh.join(1)
    device = MemoryBackend(interface_name="wgtest")
    writer = DeviceWriter(device, Identity(LOCAL_KEY))
    decider.fold(mesh.view)
    writer.execute(decider.decide(device.read(), remove_unknown=True).plan, {})
    decider.settle(ok=False)  # as if something had failed: the next plan compares with the device
    assert decider.fold(mesh.view).needs_device
    again = decider.decide(device.read(), remove_unknown=True)
    assert again.plan.empty, "the device holds what it was given: nothing to change"
    decider.settle(ok=True)
    assert not decider.fold(mesh.view).needs_device
    decider.verify_next()  # the periodic resync
    assert decider.fold(mesh.view).needs_device
    assert decider.decide(device.read(), remove_unknown=True).plan.empty
    decider.settle(ok=True)
    new_key = NodeKey.generate()
    decider.set_public_key(new_key.public_key, mesh.view)
    assert decider.local.public_key == new_key.public_key and decider.fold(mesh.view).needs_device
    rotated = decider.decide(device.read(), remove_unknown=True)
    assert rotated.plan.set_private_key and not rotated.plan.changes


def test_an_underlay_mtu_change_reaches_the_device_only_under_mtu_auto() -> None:
    decider = Decider(LOCAL, auto_mtu=1420)
    mesh = _Mesh(decider)
    decider.fold(mesh.view)
    decider.decide(DeviceState(None, None, {}), remove_unknown=True)
    decider.settle(ok=True)
    assert decider.set_auto_mtu(1380) and decider.fold(mesh.view).needs_device
    assert decider.decide(DeviceState(None, None, {}), remove_unknown=True).mtu == 1380
    assert not decider.set_auto_mtu(1380)
    assert (ipaddress.ip_address("10.96.0.1"),) == decider.local.overlay_ips
