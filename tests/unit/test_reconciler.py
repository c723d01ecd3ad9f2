"""Decide and apply on a schedule, on the memory store and device: a pass reads the device only when it must,
keeps the host's pod network in place on full passes, and reports what it did as a value."""

from __future__ import annotations

from helpers import run
from unit.stage_parts import LOCAL, LOCAL_KEY, SCHEMA, publish, record
from warren_mesh.agent.device_thread import DeviceThread
from warren_mesh.agent.device_writer import DeviceWriter
from warren_mesh.agent.identity import Identity
from warren_mesh.agent.reconciler import Reconciler
from warren_mesh.agent.report import PassReport
from warren_mesh.identity.keys import NodeKey
from warren_mesh.mesh.decision import Decider
from warren_mesh.mesh.view import MeshView
from warren_mesh.store.memory import MemoryStore
from warren_mesh.trust.records import MeshConfig
from warren_mesh.values.device import DeviceState
from warren_mesh.wireguard.backend import BackendError
from warren_mesh.wireguard.memory import MemoryBackend


class _Pods:
    """The host's pod network, as the reconciler sees it: kept in place on every full pass."""

    def __init__(self) -> None:
        self.ensured: list[tuple[MeshConfig, int]] = []

    def ensure(self, config: MeshConfig, mtu: int) -> bool:
        self.ensured.append((config, mtu))
        return len(self.ensured) > 1  # the first upkeep fails (no nftables, say)


class _Parts:
    def __init__(self, device: MemoryBackend) -> None:
        self.view = MeshView(SCHEMA)
        self.device = device
        self.identity = Identity(LOCAL_KEY)
        self.reports: list[PassReport] = []
        self.unreadable = 0
        self.pods = _Pods()
        self.reconciler = Reconciler(
            view=self.view,
            decider=Decider(LOCAL, auto_mtu=1420),
            identity=self.identity,
            backend=device,
            writer=DeviceWriter(device, self.identity),
            device_thread=DeviceThread(inline=True),
            resync_interval=30.0,
            report=self.reports.append,
            on_device_unreadable=self._unreadable,
            pod_network=self.pods,
        )

    def _unreadable(self) -> None:
        self.unreadable += 1

    async def observe(self, store: MemoryStore) -> None:
        """Fold the store's current contents in, as the observe stage hands a snapshot on."""
        self.reconciler.notify(self.view.apply(await store.list_prefix(SCHEMA.root)))


def test_a_pass_configures_the_device_and_reports_what_it_did() -> None:
    async def body() -> None:
        store = MemoryStore()
        for i in (1, 2):
            await publish(store, record(f"n{i}", i))
        await publish(store, record("broken", 3, key=LOCAL.public_key))  # our own key: left out
        parts = _Parts(MemoryBackend(interface_name="wgtest"))
        await parts.observe(store)
        # The pod network's first upkeep failed: counted, retried by the next full pass, not the device's failure.
        assert await parts.reconciler.reconcile_once()
        report = parts.reports[-1]
        assert report.ok and report.peers == 2 and report.nodes == 3 and report.failed == 1
        assert report.applied["add"] == 2 and report.applied["private_key"] == 1
        assert set(report.published) == {"n1", "n2", "broken"}
        assert [c.name for c in report.conflicts] == ["broken"]
        assert len(parts.device.peers) == 2 and parts.device.public_key == LOCAL.public_key
        assert parts.pods.ensured == [(MeshConfig(), 1420)]
        # Nothing changed: the next (delta) pass applies nothing and does not look after the pods.
        assert await parts.reconciler.reconcile_once()
        assert not parts.reports[-1].applied and len(parts.pods.ensured) == 1
        assert set(parts.reconciler.peer_names().values()) == {"n1", "n2"}

    run(body())


def test_a_new_key_is_installed_in_a_full_pass() -> None:
    async def body() -> None:
        store = MemoryStore()
        await publish(store, record("n1", 1))
        parts = _Parts(MemoryBackend(interface_name="wgtest"))
        await parts.observe(store)
        await parts.reconciler.reconcile_once()
        new_key = NodeKey.generate()
        assert await parts.reconciler.switch_key(new_key)
        assert parts.identity.key == new_key and parts.device.public_key == new_key.public_key
        assert parts.reports[-1].applied == {"private_key": 1} and len(parts.pods.ensured) == 2

    run(body())


class _Dead(MemoryBackend):
    def read(self) -> DeviceState:
        raise BackendError("wireguard-go is gone")


def test_an_unreadable_device_is_reported_and_the_pass_retried() -> None:
    async def body() -> None:
        store = MemoryStore()
        await publish(store, record("n1", 1))
        parts = _Parts(_Dead(interface_name="wgtest"))
        await parts.observe(store)
        assert not await parts.reconciler.reconcile_once()
        assert parts.unreadable == 1 and parts.reports == [] and parts.reconciler.passes == 0
        assert not parts.device.operations, "nothing was applied to a device that could not be read"

    run(body())
