"""`warren-mesh wireguard-go`: run a node's userspace WireGuard device for the agent to adopt.

In Kubernetes every process of a container dies with it, so a wireguard-go started by the agent would stop
carrying traffic whenever the agent's pod restarts (a rollout, a new version). Run by this command in a pod of its
own (deploy/base/agent.yaml, DaemonSet warren-mesh-wireguard) it outlives the agent, which adopts it through its
UAPI socket (``--wireguard-go-runner external``). Where the kernel has WireGuard the agent uses that instead, and
this command only waits: both decide the same way (choice.kernel_wireguard_available). Stopping this command
stops the data plane (it is its owner); it is updated only when its pods are deleted (OnDelete).
"""

from __future__ import annotations

import logging
import threading

from warren_mesh.wireguard.backend import BackendError
from warren_mesh.wireguard.choice import kernel_wireguard_available
from warren_mesh.wireguard.userspace import UserspaceBackend

log = logging.getLogger(__name__)

_CHECK_INTERVAL = 1.0  # seconds between looks at the daemon (it is restarted within this after it dies)


def run(interface: str, backend: str, binary: str | None, stop: threading.Event) -> None:
    """Keep wireguard-go serving ``interface`` until ``stop`` is set (``backend``: auto or userspace), then stop
    it: this command owns the data plane (in a pod it would be killed with the pod anyway, leaving its socket
    behind; stopped here it removes its device and socket itself)."""
    if backend == "auto":
        available, why = kernel_wireguard_available()
        if available:
            log.info("%s: the agent uses it, so there is no wireguard-go to run for %s", why, interface)
            stop.wait()
            return
    device = UserspaceBackend(interface, binary=binary)
    log.info("%s serves %s", device.version, interface)
    try:
        while not stop.wait(_CHECK_INTERVAL):
            try:
                device.check()
            except BackendError as exc:
                log.error("wireguard-go for %s could not be restarted (retrying): %s", interface, exc)
    finally:
        log.info("stopping wireguard-go for %s", interface)
        device.close(remove_device=True)
