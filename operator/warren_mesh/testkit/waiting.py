"""Waiting for a condition, the one way the tests, the lab's checks and the benchmarks do it: poll until it holds
or a deadline passes, then fail naming what was awaited (and, given ``log``, what there was to see)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


class TimedOut(AssertionError):
    """What was awaited did not happen in time (an assertion: in a test, that is the failure)."""


class _Deadline:
    def __init__(self, timeout: float, what: str, log: Callable[[], str] | None) -> None:
        self._at = time.monotonic() + timeout
        self._timeout, self._what, self._log = timeout, what, log

    def check(self) -> None:
        if time.monotonic() > self._at:
            extra = f"\n--- what there is to see ---\n{self._log()}" if self._log is not None else ""
            raise TimedOut(f"timed out after {self._timeout} s waiting for {self._what}{extra}")


def wait_for(
    condition: Callable[..., Any],
    timeout: float,
    what: str,
    log: Callable[[], str] | None = None,
    *,
    interval: float = 0.05,
) -> Any:
    """Poll ``condition`` (from a thread that may block) until it returns something true; that value (typed Any:
    what is awaited is often a parsed document)."""
    deadline = _Deadline(timeout, what, log)
    while not (value := condition()):
        deadline.check()
        time.sleep(interval)
    return value


async def wait_until(
    condition: Callable[..., Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    log: Callable[[], str] | None = None,
) -> Any:
    """``wait_for`` on an event loop: the condition runs on the loop (a coroutine function's result is awaited:
    a store read, say), between polls it sleeps."""
    deadline = _Deadline(timeout, what, log)
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        deadline.check()
        await asyncio.sleep(interval)
