"""What a container runtime does to put a pod on a CNI network, for the lab's pods: run each plugin of the
network's conflist with the CNI protocol (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH in the
environment; the plugin's config, with the previous plugin's result, on stdin), in the node's network namespace,
as containerd and CRI-O do. Loopback is brought up by the runtime itself, as they do, with the loopback plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from warren_mesh.process import in_netns

CNI_PATHS: Final = ("/usr/lib/cni", "/opt/cni/bin")  # Debian's containernetworking-plugins, then the usual place


class CniError(RuntimeError):
    """A plugin refused; the message carries its own error."""


def plugin_dir() -> str:
    for directory in CNI_PATHS:
        if os.access(os.path.join(directory, "bridge"), os.X_OK):
            return directory
    raise CniError("no CNI plugins found (Debian: apt-get install containernetworking-plugins)")


@dataclass(frozen=True, slots=True)
class Attachment:
    """One pod on one node: where the plugins run, the pod's namespace, and the id the plugins file it under."""

    node_netns: str
    pod_netns: str
    container_id: str


def add(conflist: dict[str, Any], pod: Attachment) -> dict[str, Any]:
    """Attach the pod to the network; the last plugin's result."""
    _run_plugin({"cniVersion": conflist["cniVersion"], "name": "lo", "type": "loopback"}, "ADD", pod, "lo")
    result: dict[str, Any] | None = None
    for plugin in conflist["plugins"]:
        config = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        if result is not None:
            config["prevResult"] = result
        result = _run_plugin(config, "ADD", pod, "eth0")
    assert result is not None
    return result


def delete(conflist: dict[str, Any], result: dict[str, Any] | None, pod: Attachment) -> None:
    """Detach the pod: every plugin in reverse order (a pod's address goes back to the pool)."""
    for plugin in reversed(conflist["plugins"]):
        config = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        if result is not None:
            config["prevResult"] = result
        _run_plugin(config, "DEL", pod, "eth0")


def _run_plugin(config: dict[str, Any], command: str, pod: Attachment, ifname: str) -> dict[str, Any]:
    directory = plugin_dir()
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": f"/var/run/netns/{pod.pod_netns}",
        "CNI_IFNAME": ifname,
        "CNI_PATH": directory,
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    done = subprocess.run(
        [str(Path(directory) / config["type"])],
        input=json.dumps(config),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=in_netns(pod.node_netns),
        check=False,
    )
    if done.returncode != 0:
        try:
            error = json.loads(done.stdout)
            message = f"{error.get('msg', '')} {error.get('details', '')}".strip()
        except ValueError:
            message = (done.stdout + done.stderr).strip()
        raise CniError(f"CNI plugin {config['type']} {command} failed: {message}")
    if command == "DEL" or not done.stdout.strip():
        return {}
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
