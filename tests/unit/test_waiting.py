"""The one way tests wait: the condition's value once it holds, or a failure naming what was awaited."""

from __future__ import annotations

import itertools

import pytest

from helpers import run
from warren_mesh.testkit.waiting import TimedOut, wait_for, wait_until


def test_wait_for_returns_what_the_condition_returned_once_it_held() -> None:
    calls = itertools.count()
    assert wait_for(lambda: next(calls) >= 2 and "ready", 5, "three calls", interval=0) == "ready"


def test_a_wait_that_times_out_names_what_it_waited_for_and_what_there_was_to_see() -> None:
    with pytest.raises(TimedOut, match=r"(?s)waiting for the impossible.*agent log tail"):
        wait_for(lambda: False, 0.01, "the impossible", lambda: "agent log tail", interval=0.001)


def test_wait_until_awaits_a_coroutine_condition() -> None:
    async def body() -> None:
        calls = itertools.count()

        async def stored() -> int | None:
            n = next(calls)
            return n if n >= 2 else None

        assert await wait_until(stored, 5, "the third read", interval=0) == 2
        with pytest.raises(TimedOut, match="never"):
            await wait_until(lambda: 0, 0.01, "never", interval=0.001)

    run(body())
