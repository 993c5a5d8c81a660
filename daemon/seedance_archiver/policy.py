"""Pure decisions: given a task, what the provider (or the download) said, and ``now``, what next.

Nothing here does I/O or reads the clock. Jitter comes from an injected ``draw(low, high)`` (normally
``random.uniform``), so tests can pin it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from seedance_archiver import models

if TYPE_CHECKING:  # only for a type: the settings module (pydantic, the environment) stays out
    from seedance_archiver import config

Draw = Callable[[float, float], float]

# Every error is retried; waits double from the mode's floor up to this cap.
BACKOFF_CAP_SECONDS = 600.0
# A download retry talks to the file host, not the provider's API, so it may come sooner than a poll.
DOWNLOAD_RETRY_SECONDS = 5.0
# A 404 for a task never seen is retried this many polls before the id is rejected.
NOT_FOUND_POLLS = 3
NOT_FOUND_REASON = "the provider does not know this task id"
# A 403 for one task while the provider accepts the key is retried this many polls, then rejected.
FORBIDDEN_POLLS = 3
FORBIDDEN_REASON = "the provider refuses this task while it accepts the API key"

# Provider ids look like ``video_abc123def456``. Anything outside this set never reaches a URL or a key.
TASK_ID_MAX_LENGTH = 128
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class Rules:
    """The knobs the decisions depend on, taken from the settings once."""

    cadences: Mapping[str, models.Cadence]
    retention: dt.timedelta
    backoff_cap_seconds: float = BACKOFF_CAP_SECONDS
    download_retry_seconds: float = DOWNLOAD_RETRY_SECONDS
    not_found_polls: int = NOT_FOUND_POLLS
    forbidden_polls: int = FORBIDDEN_POLLS

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Rules:
        return cls(
            cadences=settings.cadences(),
            retention=dt.timedelta(seconds=settings.retention_seconds),
        )

    def cadence(self, mode: str) -> models.Cadence:
        return self.cadences.get(mode) or self.cadences[models.Mode.STANDARD.value]


def task_id_problem(task_id: str) -> str | None:
    """Why ``task_id`` cannot be a provider id, or None if it can."""
    if not task_id:
        return "invalid task id: empty"
    if len(task_id) > TASK_ID_MAX_LENGTH:
        return f"invalid task id: longer than {TASK_ID_MAX_LENGTH} characters"
    if not TASK_ID_PATTERN.fullmatch(task_id):
        return (
            "invalid task id: it may hold only letters, digits, '_', '.' and '-', "
            "and must start with a letter or digit"
        )
    return None


def backoff_seconds(attempts: int, floor: float, cap: float, draw: Draw) -> float:
    """The wait after ``attempts`` consecutive failures: doubling from ``floor``, capped, jittered.

    The jitter keeps the wait in [ceiling / 2, ceiling] and never below ``floor``, so a retry never
    comes sooner than the mode's cadence allows.
    """
    # The exponent is capped: after enough failures the wait is the cap anyway, and a float power
    # of 2 overflows past 2**1023.
    ceiling = min(cap, floor * 2 ** min(max(0, attempts - 1), 62))
    ceiling = max(ceiling, floor)
    return draw(max(floor, ceiling / 2), ceiling)


def before_deadline(task: models.Task, wait: float, floor: float, now: dt.datetime) -> float:
    """``wait``, shortened so a retry still comes before the task's deadline.

    A backoff may grow to minutes; near the deadline it is cut to half the time left (never below
    ``floor``), so a late transient failure gets several more tries instead of one after the end.
    """
    if task.expires_at is None:
        return wait
    left = (task.expires_at - now).total_seconds()
    return max(floor, min(wait, left / 2))


def deadline(created: dt.datetime, rules: Rules) -> dt.datetime:
    """When the provider deletes a task created at ``created``."""
    return created + rules.retention


def next_poll_at(task: models.Task, now: dt.datetime, rules: Rules, draw: Draw) -> dt.datetime:
    cadence = rules.cadence(task.mode)
    return now + dt.timedelta(seconds=draw(cadence.low, cadence.high))


def before_work(task: models.Task, now: dt.datetime) -> models.Task | None:
    """A terminal outcome decided without asking anyone (bad id, deadline passed), or None."""
    problem = task_id_problem(task.task_id)
    if problem is not None:
        return _finish(task, models.State.REJECTED, problem, now)
    if task.expires_at is not None and now >= task.expires_at:
        return _finish(
            task,
            models.State.EXPIRED,
            f"deadline passed: the provider deletes the task at {_iso(task.expires_at)} and the "
            "video was not archived by then",
            now,
        )
    return None


def on_answer(
    task: models.Task, answer: models.Answer, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """The task after a successful poll."""
    created = answer.created or task.provider_created_at
    # Built as one dict and applied with one copy: this runs on every poll.
    changes: dict[str, object] = {
        "provider_status": answer.status.value,
        "model": answer.model or task.model,
        "provider_created_at": created,
        "expires_at": deadline(created, rules) if created else task.expires_at,
        "last_polled_at": now,
        "polls": task.polls + 1,
        "attempts": 0,
        "error": None,
        "updated_at": now,
        "state": models.State.POLLING.value,
    }
    status = answer.status
    if status is models.Status.COMPLETED and answer.video_url:
        changes.update(
            state=models.State.DOWNLOADING.value,
            video_url=answer.video_url,
            actual_duration=answer.actual_duration,
            completed_at=task.completed_at or now,
            next_attempt_at=now,
        )
    elif status is models.Status.COMPLETED:
        changes.update(
            error="provider said completed but gave no video_url; polling again",
            next_attempt_at=next_poll_at(task, now, rules, draw),
        )
    elif status is models.Status.FAILED:
        reason = answer.error or "the provider reported the task failed without a reason"
        changes.update(state=models.State.FAILED.value, error=reason, next_attempt_at=now)
    elif status is models.Status.CANCELLED:
        reason = answer.error or "cancelled at the provider"
        changes.update(state=models.State.CANCELLED.value, error=reason, next_attempt_at=now)
    else:
        changes["next_attempt_at"] = next_poll_at(task, now, rules, draw)
    return task.replace(**changes)


def on_poll_error(
    task: models.Task,
    reason: str,
    now: dt.datetime,
    rules: Rules,
    draw: Draw,
    at_least_seconds: float = 0.0,
) -> models.Task:
    """The task after a poll that failed in a way worth retrying (5xx, timeout, malformed, 429)."""
    attempts = task.attempts + 1
    floor = rules.cadence(task.mode).low
    wait = backoff_seconds(attempts, floor, rules.backoff_cap_seconds, draw)
    wait = max(at_least_seconds, before_deadline(task, wait, floor, now))
    return task.replace(
        state=models.State.POLLING.value,
        attempts=attempts,
        polls=task.polls + 1,
        last_polled_at=now,
        error=f"{reason} (attempt {attempts}; next try in {wait:.0f}s)",
        next_attempt_at=now + dt.timedelta(seconds=wait),
        updated_at=now,
    )


def on_malformed(
    task: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """The provider answered, but not by its contract: say what was wrong, poll again at the cadence.

    No backoff: the provider is up and answering; a malformed answer is usually one bad record.
    """
    return task.replace(
        state=models.State.POLLING.value,
        attempts=task.attempts + 1,
        polls=task.polls + 1,
        last_polled_at=now,
        error=reason,
        next_attempt_at=next_poll_at(task, now, rules, draw),
        updated_at=now,
    )


def on_not_found(task: models.Task, now: dt.datetime, rules: Rules, draw: Draw) -> models.Task:
    """The task after the provider answered 404 (DESIGN.md: rejected if never seen, else expired)."""
    if task.provider_status is not None:
        return _finish(
            task.replace(polls=task.polls + 1, last_polled_at=now),
            models.State.EXPIRED,
            "the provider no longer has this task (404): it was deleted before the video was archived",
            now,
        )
    return _refused_in_a_row(
        task, NOT_FOUND_REASON, "yet (404)", "404", rules.not_found_polls, now, rules, draw
    )


def on_task_forbidden(
    task: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """A 401/403 that only this task gets (the key is accepted): retry briefly, then ``rejected``.

    The task may belong to another account, or the provider may have withdrawn it; either way it
    must not pause the daemon, and a few polls in a row make sure it was no passing glitch.
    """
    return _refused_in_a_row(
        task, FORBIDDEN_REASON, f"({reason})", reason, rules.forbidden_polls, now, rules, draw
    )


def _refused_in_a_row(
    task: models.Task,
    prefix: str,
    detail: str,
    what: str,
    limit: int,
    now: dt.datetime,
    rules: Rules,
    draw: Draw,
) -> models.Task:
    """Retry a refusal at the cadence; ``limit`` of the same kind in a row make the task ``rejected``.

    ``attempts`` counts consecutive failures of any kind; only refusals whose error starts with
    ``prefix`` count towards rejection.
    """
    previous = task.attempts if (task.error or "").startswith(prefix) else 0
    refused = previous + 1
    if refused >= limit:
        return _finish(
            task.replace(polls=task.polls + 1, last_polled_at=now, attempts=refused),
            models.State.REJECTED,
            f"{prefix} ({what} on {refused} polls in a row)",
            now,
        )
    return on_poll_error(task.replace(attempts=previous), f"{prefix} {detail}", now, rules, draw)


def on_archived(
    task: models.Task, uri: str, size: int, sha256: str, now: dt.datetime
) -> models.Task:
    return task.replace(
        state=models.State.ARCHIVED.value,
        archive_uri=uri,
        archive_bytes=size,
        archive_sha256=sha256,
        archived_at=now,
        attempts=0,
        error=None,
        updated_at=now,
        next_attempt_at=now,
    )


def on_download_error(
    task: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """A download or storage failure worth retrying: keep the link, try again after a backoff."""
    attempts = task.attempts + 1
    floor = rules.download_retry_seconds
    wait = backoff_seconds(attempts, floor, rules.backoff_cap_seconds, draw)
    wait = before_deadline(task, wait, floor, now)
    return task.replace(
        state=models.State.DOWNLOADING.value,
        attempts=attempts,
        error=f"{reason} (attempt {attempts}; next try in {wait:.0f}s)",
        next_attempt_at=now + dt.timedelta(seconds=wait),
        updated_at=now,
    )


def on_link_expired(task: models.Task, reason: str, now: dt.datetime, rules: Rules) -> models.Task:
    """The video link was refused: poll again for a fresh one, no sooner than the cadence allows."""
    earliest = now
    if task.last_polled_at is not None:
        earliest = max(
            now, task.last_polled_at + dt.timedelta(seconds=rules.cadence(task.mode).low)
        )
    return task.replace(
        state=models.State.POLLING.value,
        video_url=None,
        attempts=task.attempts + 1,
        error=f"{reason}; polling for a fresh video_url",
        next_attempt_at=earliest,
        updated_at=now,
    )


def on_refused(task: models.Task, reason: str, now: dt.datetime) -> models.Task:
    """A video we must not fetch (too large, unsafe link): terminal, with the reason."""
    return _finish(task, models.State.REJECTED, reason, now)


def _finish(
    task: models.Task, state: models.State, reason: str | None, now: dt.datetime
) -> models.Task:
    return task.replace(state=state.value, error=reason, updated_at=now, next_attempt_at=now)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
