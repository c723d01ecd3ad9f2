"""The keys whose current value the view rejected: each version reported (logged, handed on) once, the count by
reason kept for the invalid-records gauge, and whether a batch cleared any (a pass must follow: the gauge falls).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Container

from warren_mesh.mesh.changes import Rejection
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.text import one_line, printable

log = logging.getLogger(__name__)


class RejectedKeys:
    def __init__(self) -> None:
        self._current: dict[str, tuple[int, str]] = {}  # key -> (mod revision already reported, reason)
        self._new: list[Rejection] = []  # reported since the last take
        self._cleared = False  # a key rejected before is gone or valid now, since the last take

    def report(self, key: str, mod_revision: int, exc: RecordError, *, trace: BaseException | None = None) -> None:
        """Count and log a rejected version once; ``trace``: the bug of ours it hit, logged with it."""
        reported = self._current.get(key)
        if reported is not None and reported[0] == mod_revision:
            return  # already reported this very version (seen again in a snapshot)
        self._current[key] = (mod_revision, exc.reason)
        message = one_line(str(exc))  # one bounded line, whatever the record held
        log.warning(
            "rejected %s (revision %d, %s): %s",
            printable(key),
            mod_revision,
            exc.reason,
            message,
            exc_info=(type(trace), trace, trace.__traceback__) if trace is not None else None,
        )
        self._new.append(Rejection(key, exc.reason, message))

    def clear(self, key: str) -> None:
        """``key``'s value is gone, or valid now: it no longer counts as rejected."""
        if self._current.pop(key, None) is not None:
            self._cleared = True

    def keep_only(self, present: Container[str]) -> None:
        """A snapshot: keys no longer there are forgotten (a snapshot changes everything anyway)."""
        self._current = {k: r for k, r in self._current.items() if k in present}

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self._current.values()))

    def take(self) -> tuple[tuple[Rejection, ...], bool]:
        """What was reported since the last call, and whether any key was cleared; both start again."""
        new, cleared = tuple(self._new), self._cleared
        self._new.clear()
        self._cleared = False
        return new, cleared
