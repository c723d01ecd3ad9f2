"""Child-process setup only the kernel can do: dying with the parent, starting inside a network namespace.

These run between fork and exec, where only async-signal-safe work is allowed, so libc is loaded here in the
parent and the child makes single system calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable

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
