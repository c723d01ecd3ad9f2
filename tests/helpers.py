"""Helpers the tests share (plain functions and classes; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


class AgentProcess:
    """`warren-mesh agent` as a real process (memory backend), for tests that SIGKILL or restart it."""

    def __init__(self, args: list[str], log_path: Path, *, max_open_files: int | None = None) -> None:
        """``max_open_files``: the agent's descriptor limit (RLIMIT_NOFILE), as systemd's default of 1024 sets it."""
        self.args = args
        self.log_path = log_path
        self.max_open_files = max_open_files
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # prlimit sets the limit and execs the agent (same process): no preexec_fn in a test run with threads.
        limit = [] if self.max_open_files is None else ["prlimit", f"--nofile={self.max_open_files}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*limit, sys.executable, "-m", "warren_mesh.cli", *self.args], stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
