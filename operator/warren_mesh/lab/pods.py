"""Pods on the lab's nodes: network namespaces attached through the standard CNI plugins with the config each
agent wrote.
"""

from __future__ import annotations

import json
import subprocess
import time

from warren_mesh.host import cni
from warren_mesh.lab import cni_runtime, netns
from warren_mesh.lab.layout import (
    LabError,
    LabLayout,
)
from warren_mesh.lab.report import LabPod


class LabPods(LabLayout):
    def add_pod(self, node: str, pod: str, *, timeout: float = 30.0) -> LabPod:
        """A pod on ``node``: a network namespace attached to the node's CNI network by the standard plugins, with
        the conflist its agent wrote, as a container runtime does."""
        index = self._index_of(node)
        if not pod or not pod.replace("-", "").isalnum() or len(pod) > 20:
            raise LabError(f"pod name {pod!r}: letters, digits and '-', at most 20")
        state = self._load()
        pods = state.setdefault("pods", {})
        assert isinstance(pods, dict)
        if pod in pods.get(self.node_name(index), {}):
            raise LabError(f"{node} has a pod {pod} already")
        conflist_path = self.cni_dir(index) / cni.CONFLIST_NAME
        deadline = time.monotonic() + timeout
        while not conflist_path.exists():
            if time.monotonic() > deadline:
                raise LabError(f"{node}'s agent wrote no CNI network config ({conflist_path}) in {timeout:.0f} s")
            time.sleep(0.1)
        conflist = json.loads(conflist_path.read_text())
        attachment = cni_runtime.Attachment(self.node_netns(index), self.pod_netns(index, pod), f"{node}-{pod}")
        netns.create(attachment.pod_netns)
        try:
            result = cni_runtime.add(conflist, attachment)
        except BaseException:
            netns.remove(attachment.pod_netns)
            raise
        ips = [str(entry["address"]).split("/", 1)[0] for entry in result["ips"]]  # one per family
        ip = ips[0]
        pods.setdefault(self.node_name(index), {})[pod] = {
            "netns": attachment.pod_netns,
            "ip": ip,
            "ips": ips,
            "result": result,
        }
        self._save(state)
        return LabPod(pod, self.node_name(index), attachment.pod_netns, ip, tuple(ips))

    def delete_pod(self, node: str, pod: str) -> None:
        index = self._index_of(node)
        state = self._load()
        pods = state.get("pods", {})
        assert isinstance(pods, dict)
        entry = pods.get(self.node_name(index), {}).pop(pod, None)
        if entry is None:
            raise LabError(f"{node} has no pod {pod}")
        conflist_path = self.cni_dir(index) / cni.CONFLIST_NAME
        attachment = cni_runtime.Attachment(self.node_netns(index), entry["netns"], f"{self.node_name(index)}-{pod}")
        try:
            if conflist_path.exists():
                cni_runtime.delete(json.loads(conflist_path.read_text()), entry["result"], attachment)
        finally:
            netns.remove(entry["netns"])
            self._save(state)

    def pods(self) -> list[LabPod]:
        pods = self._load().get("pods", {})
        assert isinstance(pods, dict)
        return [
            LabPod(name, node, entry["netns"], entry["ip"], tuple(entry.get("ips", [entry["ip"]])))
            for node, on_node in sorted(pods.items())
            for name, entry in sorted(on_node.items())
        ]

    def pod_exec_argv(self, node: str, pod: str, command: list[str]) -> list[str]:
        for known in self.pods():
            if known.name == pod and node in (known.node, str(self._index_of(node))):
                return ["ip", "netns", "exec", known.netns, *command]
        raise LabError(f"{node} has no pod {pod}")

    def pod_ping(self, source: LabPod, address: str) -> bool:
        argv = ["ip", "netns", "exec", source.netns, "ping", "-c", "1", "-W", "2", address]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def ping_pods(self) -> list[tuple[str, str, bool]]:
        """Ping every pod (each of its addresses of a family the source has) from every pod on another node."""
        pods = self.pods()
        return [
            (f"{a.node}/{a.name}", f"{b.node}/{b.name}", all(self.pod_ping(a, ip) for ip in _shared(a, b)))
            for a in pods
            for b in pods
            if a.node != b.node and self.shares_underlay(self._index_of(a.node), self._index_of(b.node))
        ]


def _shared(source: LabPod, target: LabPod) -> tuple[str, ...]:
    """``target``'s addresses of the families ``source`` has an address of (a pod made before its mesh became
    dual-stack has IPv4 only)."""
    families = {":" in ip for ip in source.ips}
    return tuple(ip for ip in target.ips if (":" in ip) in families)
