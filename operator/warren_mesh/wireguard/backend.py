"""The one interface every WireGuard data plane implements: read the device, change it one piece at a time.

Methods are synchronous and small on purpose. Each maps to one netlink request (kernel) or one UAPI ``set``
(wireguard-go), so a plan is applied as exactly the operations it lists, and a failure names the peer it hit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from warren_mesh.identity.keys import NodeKey
from warren_mesh.values.device import DeviceState, InterfaceSpec, PeerSpec


class BackendError(RuntimeError):
    """The device refused or failed a change."""


class Backend(Protocol):
    @property
    def name(self) -> str:
        """``kernel``, ``userspace`` or ``memory``: what the agent reports as its backend."""
        ...

    @property
    def interface_name(self) -> str: ...

    @property
    def version(self) -> str:
        """What moves the packets, and its version: ``wireguard-go 0.0.20230223``, ``kernel module 1.0.0``; empty
        for a simulated device."""
        ...

    def read(self) -> DeviceState:
        """The device as it is now; a device that does not exist yet reads as empty (no interface)."""
        ...

    def set_private_key(self, key: NodeKey) -> None: ...

    def configure_interface(self, spec: InterfaceSpec) -> None:
        """Create the device if needed and set address, listen port and MTU, and bring it up."""
        ...

    def set_peer(self, spec: PeerSpec, *, adding: tuple[str, ...] | None = None) -> None:
        """Add the peer, or update it in place (its session survives). Routes are changes of their own.
        ``adding``: the device has this peer with ``spec``'s allowed IPs but these; only they are written, the
        others kept as they are (replacing them all leaves the peer without any for a moment)."""
        ...

    def set_peers(self, specs: Sequence[PeerSpec], *, adding: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """``set_peer`` for each (``adding`` by public key), in as few device transactions as the backend can (all
        or nothing where it can say so: on an error the caller goes peer by peer)."""
        ...

    def remove_peer(self, spec: PeerSpec) -> None:
        """Remove the peer (``spec`` is what the device had)."""
        ...

    def add_route(self, network: str) -> None:
        """Route ``network`` to the device, marked as the mesh's; never over a route the mesh does not own."""
        ...

    def remove_route(self, network: str) -> None:
        """Remove the mesh's route for ``network`` through the device (gone already is fine)."""
        ...

    def check(self) -> bool:
        """Repair the data plane if it died (a crashed daemon); True when the device must be configured again."""
        ...

    def close(self, *, remove_device: bool) -> None:
        """Release resources; the device itself stays unless ``remove_device`` (traffic outlives the agent)."""
        ...
