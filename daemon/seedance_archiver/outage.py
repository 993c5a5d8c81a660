"""Whether the provider is in an outage, judged from what the polls of the last few minutes got.

A 404 is the provider's word that a task is gone only while the provider otherwise answers as usual.
Two shapes of trouble say it does not:

- most polls get no answer from the API itself: a 5xx, a timeout, no connection, or a 404 that is
  not the provider's own JSON (a gateway's HTML page, an empty body);
- most tasks the provider has answered for, and that are still well inside their lifetime, get the
  provider's own 404: its API lost its data, or sends every path to the wrong place.

Either is an outage while it holds: the latest poll of at least :data:`MIN_TASKS` tasks in the
window went so, at least :data:`SHARE` of the tasks counted. During the second, a 404 for a task
before its deadline is not counted against it (:meth:`Health.storm`). A batch of ids the provider
never knew is no outage: only tasks it had answered for count there. Pure bookkeeping: the caller
passes the time.
"""

from __future__ import annotations

import collections

MIN_TASKS = 5
SHARE = 0.8


class Health:
    """The provider's health from each task's latest poll in the last ``window_seconds``: a task
    polled ten times counts once. Running totals keep a poll's cost O(1) (this runs on every poll).
    """

    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = window_seconds
        # task id -> (when, failed, known, gone), oldest first
        self._latest: collections.OrderedDict[str, tuple[float, bool, bool, bool]] = (
            collections.OrderedDict()
        )
        self._tasks = 0
        self._failed = 0
        self._known = 0
        self._gone = 0

    def _count(self, entry: tuple[float, bool, bool, bool], sign: int) -> None:
        _, failed, known, gone = entry
        self._tasks += sign
        self._failed += sign * failed
        self._known += sign * known
        self._gone += sign * (known and gone)

    def _forget_before(self, now: float) -> None:
        oldest = now - self.window_seconds
        while self._latest:
            task_id, entry = next(iter(self._latest.items()))
            if entry[0] >= oldest:
                break
            del self._latest[task_id]
            self._count(entry, -1)

    def _record(self, now: float, task_id: str, entry: tuple[float, bool, bool, bool]) -> None:
        self._forget_before(now)
        before = self._latest.pop(task_id, None)
        if before is not None:
            self._count(before, -1)
        self._latest[task_id] = entry
        self._count(entry, 1)

    def answered(self, now: float, task_id: str, *, gone: bool, known: bool) -> None:
        """The API itself answered about ``task_id``: ``gone`` when with its own 404, ``known``
        when about a task it has answered for before that is well inside its lifetime."""
        self._record(now, task_id, (now, False, known, gone))

    def failed(self, now: float, task_id: str) -> None:
        """A poll got no answer from the API itself (5xx, timeout, no connection, a foreign 404)."""
        self._record(now, task_id, (now, True, False, False))

    def storm(self, now: float) -> bool:
        """Whether most tasks the provider should still have get its 404 (its own, JSON)."""
        self._forget_before(now)
        return _most(self._gone, self._known)

    def outage(self, now: float) -> str | None:
        """Why the provider looks out of order, or None while it answers as usual."""
        self._forget_before(now)
        if _most(self._failed, self._tasks):
            return (
                f"the last poll of {self._failed} of {self._tasks} tasks got no answer from the "
                "provider's API (5xx, timeouts, no connection, 404s that are not its own)"
            )
        if _most(self._gone, self._known):
            return (
                f"the provider answered 404 for {self._gone} of {self._known} tasks it had "
                "answered for and should still have"
            )
        return None


def _most(some: int, of: int) -> bool:
    return some >= MIN_TASKS and some >= SHARE * of
