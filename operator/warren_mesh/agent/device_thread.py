"""Where device calls run: on one dedicated thread for real devices, inline for the memory device.

pyroute2's synchronous API cannot be used inside a running asyncio loop, and its netlink sockets belong to the
thread that made them. So every call into a real backend, from creating it to closing it, runs on the same
single worker thread, while deciding what to do stays on the event loop (where the mesh view lives).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")


class DeviceThread:
    def __init__(self, *, inline: bool = False) -> None:
        self._executor = None if inline else ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")

    async def run(self, call: Callable[[], _T]) -> _T:
        if self._executor is None:
            return call()
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def call(self, call: Callable[[], _T], *, timeout: float) -> _T:
        """Run ``call`` from a thread other than the event loop's (the metrics server's), waiting for it.

        Inline (memory device) the call runs on the caller's thread: the memory device's reads copy its dicts in
        one step, which is safe against the loop changing them.
        """
        if self._executor is None:
            return call()
        return self._executor.submit(call).result(timeout=timeout)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
