"""What only the kernel can do for us: a child that dies with its parent or starts inside a network namespace,
a connection made from inside a namespace, and whether (and until when) a process lives.

The preexec functions run between fork and exec, where only async-signal-safe work is allowed, so libc is loaded
here in the parent and the child makes single system calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


def die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when the thread that started it ends (with the main thread: when
    the process dies, e.g. a killed test run). Only use it from a thread that lives as long as the process."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def in_netns(name: str | None, *, tied_to_parent: bool = False) -> Callable[[], None] | None:
    """A preexec_fn that moves the child into network namespace ``name`` (None: stay where we are)."""
    if name is None:
        return die_with_parent if tied_to_parent else None
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
            os._exit(126)
        if tied_to_parent:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return enter


def connect_in_netns(name: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to ``address`` as seen from inside network namespace ``name``.

    A socket belongs to the namespace it was created in, and setns() moves only the calling thread, so a thread
    of its own enters the namespace, connects, and ends; the socket is then used from anywhere.
    """
    outcome: list[socket.socket | OSError] = []

    def connect() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"cannot enter network namespace {name}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            outcome.append(socket.create_connection(address, timeout=timeout))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, name=f"connect-in-{name}", daemon=True)
    thread.start()
    thread.join()
    if isinstance(outcome[0], OSError):
        raise outcome[0]
    return outcome[0]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our own exited child not yet reaped) counts as dead.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to end (reaping it if it is our child); whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def stop_child(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a child of ours: SIGTERM, SIGKILL if it is not gone within ``timeout`` s, and reap it either way."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
