"""Kernel WireGuard for real: the end-to-end lab scenario inside a QEMU VM booting Debian's kernel.

This machine's kernel has no WireGuard module, so hack/kernel_vm.py boots Debian's stock kernel under TCG with
this checkout mounted read-only and runs the kernel tests there: the lab scenario on kernel WireGuard, a
300-peer device read back whole, and routes that follow a link replaced behind the backend's back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from warren_mesh.lab import kernel_vm

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the VM harness needs root (kernel download, QEMU)")


# Under TCG the kernel scenarios take 4.5-5 minutes, near the suite's 300 s default; run_in_vm bounds it itself.
@pytest.mark.timeout(1300)
def test_kernel_mesh_in_vm() -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("busybox") is None:
        pytest.skip("qemu-system-x86 or busybox-static is not installed (hack/setup installs them with apt-get)")
    try:
        kernel_vm.prepare()
    except (subprocess.CalledProcessError, kernel_vm.VMError) as exc:
        pytest.skip(f"Debian's kernel package could not be downloaded or unpacked: {exc}")
    command = (
        f"{sys.executable} -m pytest -q --color=no --tb=short -p no:cacheprovider -p no:logging -k kernel -x "
        "tests/dataplane/test_lab.py tests/dataplane/test_kernel_backend.py"
    )
    code, output = kernel_vm.run_in_vm(command, workdir=ROOT, timeout=1200)
    tail = output[-8000:]  # room for the lab's report of the nodes that did not join
    assert code == 0, tail
    # Every selected test ran with kernel WireGuard: none skipped (the inner run stops at the first failure).
    assert re.search(r"^\d+ passed, \d+ deselected in ", output, re.MULTILINE) and "skipped" not in output, tail
