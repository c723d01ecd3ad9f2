"""Run a command inside a QEMU VM that boots Debian's kernel, so kernel WireGuard can be tested on machines
whose own kernel has no WireGuard module.

    sudo .venv/bin/python hack/kernel_vm.py -- .venv/bin/python -m pytest tests/dataplane/test_lab.py -k kernel

(hack/kernel_vm.py runs ``main`` of this module; the tests call ``prepare`` and ``run_in_vm``.)

The VM boots Debian 12's stock kernel, pinned (KERNEL_PACKAGE: `apt-get download`, unpacked with dpkg -x; cached in
/var/cache/warren-mesh-vm, outside the repository) with a tiny busybox initramfs that loads WireGuard, veth, bridge
and 9p, mounts the host's root read-only over virtio-9p, puts a tmpfs on /run (also the scratch space: TMPDIR),
and chroots into it: the command runs with this very checkout, venv and Debian packages. Its output comes back
over the serial console (also written to a file as it comes, console-PID.log in the cache, to watch a long run);
the exit code is carried by a marker line. KVM does not work on these machines, so the VM runs under TCG emulation
(boot to shell takes ~5 s).

Under TCG every Python process is what costs: a process's imports are thousands of file lookups, each a 9p round
trip through the emulated virtio device. The host's root is mounted with ``cache=loose`` (the mount is read-only
and the VM's only view of it), so lookups after the first are answered from the guest's own caches: 20,000
os.stat() calls 17-66 s -> 0.9 s, `import warren_mesh.cli` 16-20 s -> 7.5 s (measured in this VM, 2026-12-06).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path("/var/cache/warren-mesh-vm")
# nf_tables, nft_chain_nat and nft_masq: the masquerade table a node keeps for its pods (host/forwarding.py).
# crc32c_generic first: libcrc32c (which they need) asks the crypto API for crc32c when it loads, a soft
# dependency modules.dep does not list.
WANTED_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "wireguard",
    "veth",
    "bridge",
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
)
EXIT_MARKER = "WARREN_VM_EXIT="  # printed by INIT with the command's exit code

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules.order); do insmod "/modules/$module" || echo "insmod $module failed"; done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /host || echo "9p mount failed"
mount -t tmpfs tmpfs /host/run
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
ip link set lo up
chroot /host /bin/sh -c "$(cat /command)"
echo "WARREN_VM_EXIT=$?"
poweroff -f
"""


class VMError(RuntimeError):
    pass


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


# The kernel the VM boots, pinned: every machine tests the same kernel, and a new Debian kernel is a change of
# this line that CI checks, not something a refreshed apt list brings in unseen (the -56 -> -57 move of 2026-12
# did exactly that). `apt-cache depends linux-image-amd64` names Debian 12's current one; WARREN_MESH_VM_KERNEL
# (a package name, e.g. linux-image-6.1.0-56-amd64) boots another for a comparison.
KERNEL_PACKAGE = "linux-image-6.1.0-57-amd64"
KERNEL_VERSION = "6.1.192-3"


def _download(package: str, version: str | None) -> Path:
    """The package's .deb in CACHE; apt's lists are refreshed once if they do not know it."""
    wanted = f"{package}={version}" if version else package
    for attempt in (1, 2):
        done = subprocess.run(["apt-get", "download", wanted], cwd=CACHE, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return next(CACHE.glob(f"{package}_*.deb"))
        if attempt == 1:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    why = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
    raise VMError(
        f"Debian's kernel package {wanted} cannot be downloaded ({why}): if the mirror no longer has it, pin the one "
        "`apt-cache depends linux-image-amd64` names in KERNEL_PACKAGE/KERNEL_VERSION (testkit/kernel_vm.py)"
    )


def prepare(package: str | None = None) -> tuple[Path, Path]:
    """Download and unpack the kernel once (cached, so a later run needs no mirror); build the initramfs.
    Returns (vmlinuz, initramfs). Raises VMError, saying why, when the kernel cannot be had."""
    chosen = package or os.environ.get("WARREN_MESH_VM_KERNEL")
    package, pin = (chosen, None) if chosen else (KERNEL_PACKAGE, KERNEL_VERSION)
    version = package.removeprefix("linux-image-")
    root = CACHE / package
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob("*.deb"):
            old.unlink()
        deb = _download(package, pin)
        shutil.rmtree(root, ignore_errors=True)
        try:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
            subprocess.run(["depmod", "-b", str(root), version], check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise VMError(f"{deb.name} could not be unpacked: {exc.stderr.decode(errors='replace').strip()}") from exc
        finally:
            deb.unlink()
        if not vmlinuz.exists():
            raise VMError(f"{deb.name} has no {vmlinuz.relative_to(root)}")
    initramfs = CACHE / f"initramfs-{version}.gz"
    initramfs.write_bytes(_initramfs(root / "lib" / "modules" / version))
    return vmlinuz, initramfs


def _module_order(modules_dir: Path) -> list[Path]:
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in WANTED_MODULES:
        if name not in by_name:
            raise VMError(f"the kernel package has no module {name}")
        visit(by_name[name])
    return [modules_dir / p for p in order]


def _initramfs(modules_dir: Path) -> bytes:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise VMError("busybox is not installed (apt-get install busybox-static)")
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules", "host"):
        archive.directory(directory)
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    archive.file("init", INIT.encode(), 0o755)
    modules = _module_order(modules_dir)
    for module in modules:
        archive.file(f"modules/{module.name}", module.read_bytes(), 0o644)
    archive.file("modules.order", "\n".join(m.name for m in modules).encode() + b"\n", 0o644)
    return archive.finish()


class _Cpio(io.BytesIO):
    """Just enough of the "newc" cpio format for an initramfs."""

    def __init__(self) -> None:
        super().__init__()
        self._inode = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        fields = [self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        self._inode += 1
        self.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.write(data)
        self.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return gzip.compress(self.getvalue(), compresslevel=1)


def run_in_vm(
    command: str, *, workdir: Path | None = None, memory_mb: int = 2048, timeout: float = 900.0
) -> tuple[int, str]:
    """Boot, run ``command`` in the repository directory inside the VM, power off. Returns (exit code, output)."""
    vmlinuz, initramfs = prepare()
    with_command = CACHE / "initramfs-run.gz"
    archive = _Cpio()
    # /tmp is left as it is (read-only): the checkout may live there. Scratch space is a tmpfs under /run.
    env = "PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/run/vm-tmp TMPDIR=/run/vm-tmp"
    where = Path.cwd() if workdir is None else workdir  # the host's root is the VM's: the same path works there
    setup = f"mkdir -p /run/vm-tmp && cd {shlex.quote(str(where))} && export {env}"
    archive.file("command", f"{setup} && {command}".encode(), 0o644)
    # Two concatenated gzip'd cpio archives form one initramfs: the cached base, then the command.
    with_command.write_bytes(initramfs.read_bytes() + archive.finish())
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMError("qemu is not installed (apt-get install qemu-system-x86)")
    argv = [
        qemu,
        "-accel",
        "tcg",
        "-m",
        str(memory_mb),
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(with_command),
        "-virtfs",
        "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3",
    ]
    # The console goes to a file as it comes, so a run that hangs can be watched (tail -f) and its end read.
    console = CACHE / f"console-{os.getpid()}.log"
    started = time.monotonic()
    try:
        with console.open("wb") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        output = console.read_bytes().decode(errors="replace")
    finally:
        console.unlink(missing_ok=True)
    match = re.search(rf"{EXIT_MARKER}(\d+)", output)
    if match is None:
        raise VMError(
            f"the VM ended without an exit marker after {time.monotonic() - started:.0f} s:\n{output[-4000:]}"
        )
    return int(match.group(1)), output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... to run in the repository")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("kernel_vm.py downloads a kernel package and starts QEMU: run it as root")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("usage: kernel_vm.py -- COMMAND ...")
    code, output = run_in_vm(shlex.join(command))
    sys.stdout.write(output)
    return code
