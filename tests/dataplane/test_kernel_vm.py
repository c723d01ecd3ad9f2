"""Kernel WireGuard for real: the end-to-end lab scenario inside a QEMU VM booting Debian's kernel.

This machine's kernel has no WireGuard module, so hack/kernel_vm.py boots Debian's stock kernel under TCG with
this checkout mounted read-only and runs the kernel tests there: the lab scenario on kernel WireGuard, the
gateways of two locations and their failover, a 300-peer device read back whole, and routes that follow a link
replaced behind the backend's back.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from warren_mesh.testkit import kernel_vm

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the VM harness needs root (kernel download, QEMU)")

# The inner run's files (each lab agent's log among them) live on the VM's tmpfs and die with it: on a failure the
# command prints the end of every log there, so the console carries what the agents said.
LOGS_ON_FAILURE = (
    'code=$?; if [ "$code" -ne 0 ]; then for f in $(find /run/vm-tmp/pytest -name "*.log"); do '
    'echo "--- log $f"; tail -n 60 "$f"; done; fi; exit "$code"'
)


# Under TCG the kernel scenarios take 6.5-8 minutes (a Python start alone ~10 s), past the suite's 300 s default;
# run_in_vm bounds it itself.
@pytest.mark.timeout(1300)
def test_kernel_mesh_in_vm() -> None:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        assert shutil.which(tool), f"{tool} is missing: hack/setup installs {package}"
    # No skip: a kernel package that cannot be had is a red run that says why, not a tier that quietly vanishes.
    kernel_vm.prepare()
    command = (
        f"{sys.executable} -m pytest -q --color=no --tb=short -p no:cacheprovider -p no:logging -k kernel -x "
        # TCG runs a lab scenario some 20 times slower than the host: each gets twice the host's 300 s default.
        "-o timeout=600 --basetemp=/run/vm-tmp/pytest "
        "tests/dataplane/test_lab.py tests/dataplane/test_topology.py tests/dataplane/test_kernel_backend.py; "
        + LOGS_ON_FAILURE
    )
    code, output = kernel_vm.run_in_vm(command, workdir=ROOT, timeout=1200)
    # The inner run's report from its failures on (agents' logs included), or its end.
    report = output[output.find("= FAILURES =") :] if "= FAILURES =" in output else output[-8000:]
    assert code == 0, report[-30000:]
    # Every selected test ran with kernel WireGuard: none skipped (the inner run stops at the first failure).
    assert re.search(r"^\d+ passed, \d+ deselected in ", output, re.MULTILINE) and "skipped" not in output, report


def test_a_kernel_that_cannot_be_had_fails_with_the_reason() -> None:
    """No skip when the mirror lacks the kernel: prepare() says which package and what to do."""
    with pytest.raises(kernel_vm.VMError, match=r"linux-image-0\.0\.0-0-amd64 cannot be downloaded .* KERNEL_PACKAGE"):
        kernel_vm.prepare("linux-image-0.0.0-0-amd64")
