#!/usr/bin/env python3
"""Run a command inside a QEMU VM with kernel WireGuard, in this checkout: see warren_mesh.testkit.kernel_vm.

sudo .venv/bin/python hack/kernel_vm.py -- .venv/bin/python -m pytest tests/dataplane/test_lab.py -k kernel
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from warren_mesh.testkit import kernel_vm

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    sys.exit(kernel_vm.main())
