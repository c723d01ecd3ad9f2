"""The cgroups of the nodes of hack/k8s_nodes.py: every process a node starts (containerd, the kubelet, kube-proxy
and every pod) lives under one cgroup of its own in each v1 hierarchy, so that taking the node down finds and kills
exactly what it started."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "warren-mesh-k8s"


class NodeError(RuntimeError):
    """A node, or its cgroups, could not be set up or taken down; the message says what failed."""


def require_cgroup_v1() -> None:
    """Refuse, before anything starts, on a host that mounts only the unified (v2) hierarchy.

    These nodes put the kubelet, containerd and every pod of a node under one cgroup in each v1 hierarchy, and
    `down` finds everything a node started there. Kubernetes 1.20 (the only kubelet that builds from Debian's
    source) treats cgroup v2 as experimental, and these machines boot hybrid v1, so a v2 harness could not be
    tested here: it is refused rather than guessed (a stock Debian 12 boots v2 only;
    `systemd.unified_cgroup_hierarchy=0` on its kernel command line gives the hybrid layout this harness needs)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        raise NodeError(
            "k8s-up --nodes needs cgroup v1 hierarchies, and this host mounts only cgroup v2 at /sys/fs/cgroup: boot "
            "it with systemd.unified_cgroup_hierarchy=0 (Kubernetes 1.20's kubelet, the one built here, is not "
            "tested on v2 by this harness)"
        )


def cgroup_dir(name: str) -> Path:
    """Node ``name``'s cgroup in the pids hierarchy, which sees every process the node started."""
    return CGROUP_ROOT / "pids" / CGROUP_PARENT / name


def _hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (the kubelet needs its cgroup root in each, the named systemd one included)."""
    found = []
    for entry in sorted(CGROUP_ROOT.iterdir()):
        if entry.name == "unified" or entry.is_symlink() or not (entry / "cgroup.procs").exists():
            continue
        found.append(entry)
    return found


def cgroup_of(name: str) -> str:
    return f"/{CGROUP_PARENT}/{name}"


def make_cgroup(name: str) -> None:
    for hierarchy in _hierarchies():
        path = hierarchy / CGROUP_PARENT / name
        path.mkdir(parents=True, exist_ok=True)
        if hierarchy.name == "cpuset":  # a new cpuset has no CPUs or memory nodes until given its parent's
            for parent, child in ((hierarchy, hierarchy / CGROUP_PARENT), (hierarchy / CGROUP_PARENT, path)):
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    if not (child / knob).read_text().strip():
                        (child / knob).write_text((parent / knob).read_text())


def join_cgroup(name: str) -> None:
    """Move the calling process into the cgroup (in every hierarchy); for preexec_fn."""
    for hierarchy in _hierarchies():
        (hierarchy / CGROUP_PARENT / name / "cgroup.procs").write_text("0")


def cgroup_pids(name: str) -> list[int]:
    """Every process in the cgroup and below it (the pids hierarchy sees them all)."""
    base = cgroup_dir(name)
    found: list[int] = []
    if not base.exists():
        return found
    for directory, _, _ in os.walk(base):
        with contextlib.suppress(OSError):
            found.extend(int(line) for line in (Path(directory) / "cgroup.procs").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (reaping it first if it is a child of ours that ended)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # orphans are not reaped on these machines: a zombie is gone for our purposes


def kill_cgroup(name: str, timeout: float = 20.0) -> None:
    """Kill every process in the cgroup until none is left (containerd may start a shim while we kill)."""
    deadline = time.monotonic() + timeout
    while True:
        living = [pid for pid in cgroup_pids(name) if alive(pid)]
        if not living:
            return
        if time.monotonic() > deadline:
            raise NodeError(f"processes of {name} would not die: {living}")
        for pid in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_cgroup(name: str, timeout: float = 10.0) -> None:
    """Remove the node's cgroups. One may stay busy a moment after its processes were killed (a task still
    exiting); one that stays busy holds a zombie no one reaps (orphans are not reaped on these machines): it is
    left, empty of living processes, rather than failing the power-off (make_cgroup takes it again)."""
    deadline = time.monotonic() + timeout
    for hierarchy in _hierarchies():
        base = hierarchy / CGROUP_PARENT / name
        if not base.exists():
            continue
        for directory, _, _ in sorted(os.walk(base), key=lambda entry: -len(entry[0])):
            while True:
                try:
                    Path(directory).rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        print(f"k8s_nodes: leaving {directory}: {exc.strerror}", file=sys.stderr)
                        break
                    kill_cgroup(name)  # a process (a shim being started) may have come in since
                    time.sleep(0.2)
                else:
                    break
        with contextlib.suppress(OSError):  # the parent goes with its last node
            (hierarchy / CGROUP_PARENT).rmdir()
