"""Errors every store raises, and the retry pacing its callers share."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


class StoreError(RuntimeError):
    """The store refused a request for a reason retrying will not fix."""


class StoreUnavailable(StoreError):
    """The store could not be reached (or did not answer in time); retrying later may work."""


class LeaseNotFound(StoreError):
    """The lease named in a request has expired (or was revoked)."""


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter, so a fleet of agents does not reconnect in lockstep."""

    initial: float = 0.1
    maximum: float = 5.0
    _next: float = field(default=0.0, init=False)

    def delay(self) -> float:
        self._next = self.initial if self._next == 0.0 else min(self._next * 2, self.maximum)
        return random.uniform(self._next / 2, self._next)

    def reset(self) -> None:
        self._next = 0.0
