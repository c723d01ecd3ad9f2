"""This node's pods on the mesh: the CNI network for its pod subnet, and the forwarding and masquerade they need.

Kept as it should be by every full reconcile pass (the first, every resync, the pass after a failure), so a
deleted conflist, a forwarding switch turned off or a rule removed from our nftables table is back within one
resync. Runs on the device thread, beside the device changes.
"""

from __future__ import annotations

import logging

from warren_mesh.host import cni, forwarding, pod_bridge
from warren_mesh.settings import PodSettings
from warren_mesh.trust.records import MeshConfig
from warren_mesh.values.netaddr import IPNetwork

log = logging.getLogger(__name__)


class PodNetwork:
    def __init__(self, settings: PodSettings, *, subnets: tuple[IPNetwork, ...], interface: str) -> None:
        self._settings = settings
        self.subnets = subnets  # one per family; the mesh gaining a family adds one
        self._interface = interface

    def ensure(self, config: MeshConfig, mtu: int) -> bool:
        """Bring the conflist and the forwarding in line with ``config`` and the device's ``mtu``; whether all of
        it is in place (failures are logged and retried by the next pass)."""
        # Forwarding first: the conflist tells the container runtime that pods may start here, and a pod that
        # started before our masquerade rule existed would keep un-NATed connections (conntrack) out of the node,
        # its own address on the underlay, for as long as they last.
        routing = forwarding.PodRouting(
            self.subnets, config.pod_cidrs, config.overlay_cidrs, self._interface, config.masquerade
        )
        try:
            changed = forwarding.ensure(routing)
        except forwarding.ForwardingError as exc:
            log.error("cannot route for this node's pods (retrying): %s", exc)
            return False
        if changed:
            log.info("pod forwarding set: %s", ", ".join(changed))
        directory = self._settings.cni_conf_dir
        if directory is not None:
            # The bridge before the conflist: once the runtime sees the conflist, pods start, and the first one
            # would otherwise wait out the duplicate address detection of its IPv6 gateway (host/pod_bridge.py).
            try:
                made = pod_bridge.ensure(cni.BRIDGE, self.subnets)
            except pod_bridge.PodBridgeError as exc:
                log.error("%s (retrying)", exc)
                return False
            if made:
                log.info("pods' bridge: %s", ", ".join(made))
            try:
                config_file = cni.conflist(self.subnets, mtu=mtu, ipam_data_dir=self._settings.cni_ipam_dir)
                if cni.write_conflist(directory, config_file):
                    subnets = ", ".join(map(str, self.subnets))
                    log.info("wrote %s: pods on %s, MTU %d", directory / cni.CONFLIST_NAME, subnets, mtu)
            except OSError as exc:
                log.error("cannot write the CNI network config in %s (retrying): %s", directory, exc)
                return False
        return True

    def remove(self) -> None:
        """On --cleanup-on-exit: our nftables table and conflist go (forwarding stays on: others may need it)."""
        try:
            forwarding.remove()
        except forwarding.ForwardingError as exc:
            log.warning("could not remove the nftables table: %s", exc)
        if self._settings.cni_conf_dir is not None:
            cni.remove_conflist(self._settings.cni_conf_dir)
