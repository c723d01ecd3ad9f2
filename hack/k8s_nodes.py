"""Kubernetes nodes on this one machine, for the tests that run deploy/ for real (``hack/k8s-up --nodes N``).

A node is a network namespace on a bridge of the host (the underlay, 10.213.0.0/24; the control plane listens on
the bridge's own address) plus a mount namespace in which the host paths a node's pods share with it are the
node's own (/etc/cni/net.d, /opt/cni/bin, /var/lib/warren-mesh, /var/lib/cni, ...). So a hostNetwork pod of node i
lives in node i's network, and a hostPath volume is per node, as on separate machines. In it run the node's own
containerd (own root, state and socket), kubelet and kube-proxy, all in a cgroup of their own
(``warren-mesh-k8s/NODE`` in every hierarchy), under which the kubelet also puts its pods: ``remove`` kills
everything in that cgroup, which is everything the node started, containers included.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from k8s_cgroups import NodeError, alive, cgroup_of, join_cgroup, kill_cgroup, make_cgroup, remove_cgroup

UNDERLAY_BRIDGE = "wmk0"
UNDERLAY_PREFIX = "10.213.0"
HOST_ADDRESS = f"{UNDERLAY_PREFIX}.1"  # the control plane (API server, cluster DNS) listens here
UNDERLAY6_PREFIX = "fd00:213::"  # the underlay's IPv6 half (the cluster is dual-stack: IPv6DualStack)
HOST_ADDRESS6 = f"{UNDERLAY6_PREFIX}1"
DUAL_STACK_GATE = "--feature-gates=IPv6DualStack=true"  # Kubernetes 1.20: alpha, off by default
NETNS_PREFIX = "wmk-"
CLUSTER_DOMAIN = "cluster.local"
SANDBOX_IMAGE = "k8s.gcr.io/pause:3.2"  # the kubelet's own default, so pods need no flag to find it
# Paths of the host that a node's pods and the node's own daemons share: each node gets its own copy.
NODE_PATHS = (
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/cni",  # host-local's address allocations
    "/var/lib/warren-mesh",
    "/run/wireguard",
    "/run/containerd",  # runc's state and the shims' sockets
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/warren-mesh-k8s-volumes",  # the PersistentVolumes the harness provides (hostPath)
)
# Kernel settings the kubelet changes on the whole machine at start; saved before and put back by k8s-down.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


@dataclass(frozen=True)
class Binaries:
    kubelet: Path
    kube_proxy: Path


def node_name(index: int) -> str:
    return f"node-{index}"


def node_address(index: int) -> str:
    return f"{UNDERLAY_PREFIX}.{10 + index}"


def _run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done


def underlay_up() -> None:
    """The bridge all nodes hang on, with the control plane's address on the host's side."""
    if _run("ip", "link", "show", UNDERLAY_BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", UNDERLAY_BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{HOST_ADDRESS}/24", "dev", UNDERLAY_BRIDGE)
    # nodad: usable at once (nothing else is on this bridge), not "tentative" for the first second or two
    _run("ip", "addr", "replace", f"{HOST_ADDRESS6}/64", "dev", UNDERLAY_BRIDGE, "nodad")
    _run("ip", "link", "set", UNDERLAY_BRIDGE, "up")


def underlay_down() -> None:
    _run("ip", "link", "del", UNDERLAY_BRIDGE, check=False)


def save_sysctls(path: Path) -> None:
    if path.exists():  # saved by an earlier start that was not taken down: that one has the machine's values
        return
    values = {key: (Path("/proc/sys") / key).read_text().strip() for key in KUBELET_SYSCTLS}
    path.write_text(json.dumps(values))


def restore_sysctls(path: Path) -> None:
    if not path.exists():
        return
    for key, value in json.loads(path.read_text()).items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)
    path.unlink()


def containerd_config(home: Path) -> str:
    return f"""version = 2
root = "{home}/containerd/root"
state = "{home}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{home}/containerd.sock"
[ttrpc]
  address = "{home}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{home}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # Root on these machines lacks CAP_SYS_RESOURCE, so no process may lower its OOM score; the kubelet asks for
  # -998 (sandboxes) and runc would fail with "failed to update /proc/self/oom_score_adj". Clamp to our own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"""


# The node's first process: makes the node's paths its own inside a new mount namespace, then holds that
# namespace (and the network one) open for the daemons the harness starts in it with nsenter.
# /sys is mounted anew so that it shows the node's network devices, with the host's cgroup mounts moved onto it
# (the kubelet needs them; `ip netns exec` would drop them).
_HOLDER = """set -eu
keep="$1"
mkdir -p "$keep"
mount --rbind /sys/fs/cgroup "$keep"
umount -l /sys
mount -t sysfs sysfs /sys
mount --move "$keep" /sys/fs/cgroup
rmdir "$keep"
while read -r source target; do
  mount --bind "$source" "$target"
done
exec sleep infinity
"""


class Node:
    def __init__(self, state: Path, index: int) -> None:
        self.index = index
        self.name = node_name(index)
        self.address = node_address(index)
        self.address6 = f"{UNDERLAY6_PREFIX}{10 + index:x}"
        self.netns = f"{NETNS_PREFIX}{self.name}"
        self.home = state / "nodes" / self.name

    @property
    def socket(self) -> Path:
        return self.home / "containerd.sock"

    def _pid_file(self, what: str) -> Path:
        return self.home / f"{what}.pid"

    def pid(self, what: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self._pid_file(what).read_text())
        return None

    def create(self, created_mountpoints: list[str]) -> None:
        """The namespaces, the underlay link, the node's own paths and the process holding them."""
        self.home.mkdir(parents=True, exist_ok=True)
        _run("ip", "netns", "add", self.netns)
        host_end = f"wmk{self.index}"
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _run("ip", "link", "set", host_end, "master", UNDERLAY_BRIDGE, "up")
        inside = ("ip", "netns", "exec", self.netns)
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{self.address}/24", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        _run(*inside, "ip", "route", "add", "default", "via", HOST_ADDRESS)
        _run(*inside, "ip", "addr", "add", f"{self.address6}/64", "dev", "eth0", "nodad")
        _run(*inside, "ip", "-6", "route", "add", "default", "via", HOST_ADDRESS6)
        binds = []
        for target in NODE_PATHS:
            source = self.home / "fs" / target.lstrip("/")
            source.mkdir(parents=True, exist_ok=True)
            missing = [d for d in (Path(target), *Path(target).parents) if not d.exists()]
            for directory in reversed(missing):  # made top-down, recorded so k8s-down removes exactly these
                directory.mkdir()
                created_mountpoints.append(str(directory))
            binds.append(f"{source} {target}\n")
        make_cgroup(self.name)
        holder = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{self.netns}",
                "unshare",
                "--mount",
                "--propagation=slave",
                "sh",
                "-c",
                _HOLDER,
                "holder",
                str(self.home / "cgroup-keep"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=(self.home / "holder.log").open("ab"),
            text=True,
            start_new_session=True,  # outlives k8s-up, like a machine
            preexec_fn=lambda: join_cgroup(self.name),  # noqa: PLW1509
        )
        assert holder.stdin is not None
        holder.stdin.write("".join(binds))
        holder.stdin.close()
        self._pid_file("holder").write_text(str(holder.pid))
        deadline = time.monotonic() + 10
        while not self._holding():
            if holder.poll() is not None or time.monotonic() > deadline:
                raise NodeError(
                    f"{self.name}: the mount namespace did not come up: {(self.home / 'holder.log').read_text()}"
                )
            time.sleep(0.05)

    def _sleeper(self) -> int | None:
        """The process that holds the node's namespaces (the holder's shell execs into sleep)."""
        return self.pid("holder")

    def _holding(self) -> bool:
        pid = self._sleeper()
        if pid is None:
            return False
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
        return False

    def start(self, what: str, argv: list[str]) -> int:
        """A daemon of the node: inside its namespaces and cgroup, logging to HOME/WHAT.log, outliving k8s-up."""
        holder = self._sleeper()
        assert holder is not None
        with (self.home / f"{what}.log").open("ab") as log:
            process = subprocess.Popen(
                ["nsenter", f"--target={holder}", "--mount", "--net", "--", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: join_cgroup(self.name),  # noqa: PLW1509
            )
        self._pid_file(what).write_text(str(process.pid))
        return process.pid

    def running(self, what: str) -> bool:
        pid = self.pid(what)
        return pid is not None and alive(pid)

    def log_tail(self, what: str, size: int = 3000) -> str:
        """The end of a daemon's log; for a Go daemon that died, its error lines (not the goroutine dump)."""
        with contextlib.suppress(OSError):
            text = (self.home / f"{what}.log").read_text(errors="replace")
            errors = [line for line in text.splitlines() if line[:1] in "EF" and line[1:5].isdigit()]
            return "\n".join(errors[-15:])[-size:] if errors else text[-size:]
        return ""

    def start_containerd(self) -> None:
        config = self.home / "containerd.toml"
        config.write_text(containerd_config(self.home))
        self.start("containerd", ["containerd", "--config", str(config)])
        deadline = time.monotonic() + 30
        while _run("ctr", f"--address={self.socket}", "version", check=False).returncode != 0:
            if not self.running("containerd") or time.monotonic() > deadline:
                raise NodeError(f"{self.name}: containerd did not start:\n{self.log_tail('containerd')}")
            time.sleep(0.2)

    def import_image(self, archive: Path) -> None:
        _run("ctr", f"--address={self.socket}", "--namespace=k8s.io", "images", "import", "--no-unpack", str(archive))

    def start_kubelet(self, binaries: Binaries, kubeconfig: Path) -> None:
        kubelet_dir = self.home / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        self.start(
            "kubelet",
            [
                str(binaries.kubelet),
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address},{self.address6}",
                DUAL_STACK_GATE,
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self.socket}",
                "--runtime-request-timeout=5m",
                f"--root-dir={kubelet_dir}",
                f"--cert-dir={kubelet_dir}/pki",
                f"--volume-plugin-dir={kubelet_dir}/volume-plugins",
                "--cgroup-driver=cgroupfs",
                f"--cgroup-root={cgroup_of(self.name)}",
                "--fail-swap-on=false",
                f"--cluster-dns={HOST_ADDRESS}",
                f"--cluster-domain={CLUSTER_DOMAIN}",
                "--read-only-port=0",
                "--healthz-bind-address=127.0.0.1",
                # Images are made on this machine and imported: none can be pulled again once collected.
                "--image-gc-high-threshold=100",
                "--image-gc-low-threshold=99",
                "--eviction-hard=",
                "--node-status-update-frequency=4s",
                "--sync-frequency=10s",
            ],
        )

    def start_kube_proxy(self, binaries: Binaries, kubeconfig: Path, cluster_cidr: str) -> None:
        self.start(
            "kube-proxy",
            [
                str(binaries.kube_proxy),
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--bind-address={self.address}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={cluster_cidr}",
                DUAL_STACK_GATE,
                # Conntrack limits are the machine's, not a node's: left alone.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
            ],
        )

    def remove(self) -> None:
        """Everything the node started, its namespaces, link and files."""
        kill_cgroup(self.name)
        remove_cgroup(self.name)
        _run("ip", "netns", "del", self.netns, check=False)
        _run("ip", "link", "del", f"wmk{self.index}", check=False)
        # What the node's containers left behind is root's on a path of ours: rm as root, like the rest.
        _run("rm", "-rf", str(self.home), check=False)
