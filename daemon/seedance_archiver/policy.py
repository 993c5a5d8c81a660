"""Pure decisions: given a task, what the provider (or the download) said, and ``now``, what next.

Nothing here does I/O or reads the clock. Jitter comes from an injected ``draw(low, high)`` (normally
``random.uniform``), so tests can pin it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from seedance_archiver import errors, models

if TYPE_CHECKING:  # only for a type: the settings module (pydantic, the environment) stays out
    from seedance_archiver import config

Draw = Callable[[float, float], float]
_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)

# Every error is retried; waits double from the mode's floor up to this cap.
BACKOFF_CAP_SECONDS = 600.0
# A download retry talks to the file host, not the provider's API, so it may come sooner than a poll.
DOWNLOAD_RETRY_SECONDS = 5.0
# The provider's own 404 (its JSON error) this many polls in a row, spread over at least the mode's
# longest interval, is its word that a task is gone (seen before: expired) or never was (rejected).
NOT_FOUND_POLLS = 3
NOT_FOUND_REASON = "the provider does not know this task id"
GONE_REASON = "the provider no longer has this task"
# While most polls of tasks the provider should still have get its 404, a 404 for a task before its
# deadline is an outage, not evidence (outage.py); "should still have": at least as far before the
# deadline as the row is at risk (Rules.at_risk: an hour, or a quarter of a shorter window).
STORM_REASON = (
    "the provider answers 404 for most of the tasks it should still have: an outage, not counted "
    "against this task"
)
# A task the provider keeps unfinished this long after its creation is given up on (expired).
GIVE_UP_AFTER_DAYS = 7.0
GIVE_UP_AFTER = dt.timedelta(days=GIVE_UP_AFTER_DAYS)
GIVE_UP_REASON = "the provider kept the task unfinished past SEEDANCE_GIVE_UP_AFTER_DAYS"
# A video our own settings refuse (too large, a link our URL rules refuse) waits, downloading, and
# is tried again from the mode's longest interval, doubling up to this, and at every start.
WAITING_ON_SETTING = models.WAITING_ON_SETTING
SETTING_RETRY_CAP_SECONDS = 1800.0
# A video link refused (403/404/410) this many times in a row, each but the first fresh from a
# poll, means the provider no longer serves the video.
LINK_REFUSALS = 3
LINK_REFUSED_PREFIX = "the video link was refused"
LINK_GONE_REASON = "the provider no longer serves the video"
# A 200 that is not a video this many times in a row: ask the provider for a fresh link.
NOT_A_VIDEO_TRIES = 3
# A 403 for one task while the provider accepts the key is retried this many polls, then rejected.
FORBIDDEN_POLLS = 3
FORBIDDEN_REASON = "the provider refuses this task while it accepts the API key"

# Provider ids look like ``video_abc123def456``. Anything outside this set never reaches a URL or a key.
TASK_ID_MAX_LENGTH = 128
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# Learning: a model's skip comes from its own observed generation times once it has this many.
LEARN_MIN_SAMPLES = 50
LEARN_QUANTILE = 5.0  # percent: the skip is this low quantile of the observed times
LEARN_WINDOW = 500  # the most recent completions per model that count
# Patient polling draws a task's waits from [this x the cadence's high bound, high] (jitter kept).
PATIENT_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Learned:
    """What the observed generation times of one model say: the skip to use and the median."""

    skip_seconds: float
    median_seconds: float


@dataclasses.dataclass(frozen=True)
class Rules:
    """The knobs the decisions depend on, taken from the settings once.

    ``generation_times`` (by resolution) is empty unless the settings fill it, so a Rules built by
    hand polls on the plain cadence; ``learned`` (by model) is refreshed by the service's learn job.
    """

    cadences: Mapping[str, models.Cadence]
    retention: dt.timedelta
    backoff_cap_seconds: float = BACKOFF_CAP_SECONDS
    download_retry_seconds: float = DOWNLOAD_RETRY_SECONDS
    not_found_polls: int = NOT_FOUND_POLLS
    forbidden_polls: int = FORBIDDEN_POLLS
    link_refusals: int = LINK_REFUSALS
    give_up_after: dt.timedelta = GIVE_UP_AFTER
    setting_retry_cap_seconds: float = SETTING_RETRY_CAP_SECONDS
    not_a_video_tries: int = NOT_A_VIDEO_TRIES
    generation_times: Mapping[str, models.GenerationTime] = dataclasses.field(default_factory=dict)
    learned: Mapping[str, Learned] = dataclasses.field(default_factory=dict)
    learn_min_samples: int = LEARN_MIN_SAMPLES
    learn_quantile: float = LEARN_QUANTILE
    patient: bool = False  # tasks with a skip wait near the top of their cadence range
    # When a row is at risk, by its provider's window (the registry's: config.Settings.at_risk).
    at_risk: models.AtRisk = models.AT_RISK_HOUR

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Rules:
        return cls(
            cadences=settings.cadences(),
            retention=dt.timedelta(seconds=settings.retention_seconds),
            generation_times=settings.generation_times(),
            learn_min_samples=settings.learn_min_samples,
            learn_quantile=settings.learn_quantile,
            patient=settings.patient_polling,
            give_up_after=dt.timedelta(days=settings.give_up_after_days),
            at_risk=settings.at_risk(),
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
    if left <= 0:
        # Past it, the task goes on as long as the provider serves it, backing off as usual.
        return wait
    return max(floor, min(wait, left / 2))


def deadline(created: dt.datetime, rules: Rules) -> dt.datetime:
    """When the provider deletes a task created at ``created``."""
    return created + rules.retention


def next_poll_at(task: models.Task, now: dt.datetime, rules: Rules, draw: Draw) -> dt.datetime:
    cadence = rules.cadence(task.mode)
    return now + dt.timedelta(seconds=draw(cadence.low, cadence.high))


# --- the skip: no poll before a video can be ready ---------------------------------------------

# ``seedance_1_5_pro_720p``, ``seedance-1-5-pro_1080p``: the resolution is the name's last part.
_RESOLUTION = re.compile(r"(?:^|[_\-.])(\d{3,4}p)$", re.IGNORECASE)


def resolution(source: models.Answer | models.Task) -> str | None:
    """The resolution of a task's video (``480p``, ``720p``, ``1080p``), or None if unknown.

    The one place that knows where it comes from: a ``resolution`` the provider states (a field
    another provider may add), else the end of the model name.
    """
    stated = getattr(source, "resolution", None)
    if isinstance(stated, str) and stated.strip():
        return stated.strip().lower()
    model = source.model
    match = _RESOLUTION.search(model.strip()) if model else None
    return match.group(1).lower() if match else None


def skip_seconds(source: models.Answer | models.Task, rules: Rules) -> float | None:
    """How long after creation a video of this kind can be ready at the earliest, or None (no skip).

    The model's learned low quantile once it has enough samples, else the seed's shortest time for
    its resolution; always within [0, the seed's longest time]. An unknown resolution, or one whose
    setting is ``off``, gets no skip.
    """
    res = resolution(source)
    expected = rules.generation_times.get(res) if res is not None else None
    if expected is None:
        return None
    learned = rules.learned.get(source.model or "")
    if learned is None:
        return expected.low
    return min(max(0.0, learned.skip_seconds), expected.high)


def expected_ready_at(task: models.Task, rules: Rules) -> dt.datetime | None:
    """When a task's video is probably ready: created + the model's observed median, else the middle
    of its resolution's expected range. None when creation or resolution is unknown."""
    res = resolution(task)
    expected = rules.generation_times.get(res) if res is not None else None
    if task.provider_created_at is None or expected is None:
        return None
    learned = rules.learned.get(task.model or "")
    typical = learned.median_seconds if learned else (expected.low + expected.high) / 2
    return task.provider_created_at + dt.timedelta(seconds=min(typical, expected.high))


def not_before_ready(
    mode: str,
    created: dt.datetime | None,
    source: models.Answer | models.Task,
    polled_at: dt.datetime,
    rules: Rules,
    draw: Draw,
) -> dt.datetime:
    """The next poll of a queued or processing task of ``mode`` created at ``created``: its cadence,
    but not before its video can possibly be ready (created + :func:`skip_seconds` of ``source``, the
    answer or the task). Never sooner than the cadence allows.

    With ``rules.patient`` the wait is drawn from the top of the cadence range,
    [max(low, PATIENT_FRACTION x high), high]: a video found up to one longest interval late is
    what the plain draw allows anyway, and each longer wait is a poll saved.
    """
    cadence = rules.cadence(mode)
    skip = skip_seconds(source, rules)
    if skip is None or created is None:
        return polled_at + dt.timedelta(seconds=draw(cadence.low, cadence.high))
    low = max(cadence.low, PATIENT_FRACTION * cadence.high) if rules.patient else cadence.low
    at = polled_at + dt.timedelta(seconds=draw(low, cadence.high))
    return max(at, created + dt.timedelta(seconds=skip))


def _seconds_until_ready(task: models.Task, now: dt.datetime, rules: Rules) -> float:
    """Seconds from ``now`` until created + the skip (0 without a skip or once it is past)."""
    skip = skip_seconds(task, rules)
    if skip is None or task.provider_created_at is None:
        return 0.0
    ready = task.provider_created_at + dt.timedelta(seconds=skip)
    return max(0.0, (ready - now).total_seconds())


# --- learning the generation times from what the daemon saw ----------------------------------


@dataclasses.dataclass(frozen=True)
class ModelTimes:
    """One model's observed generation times at a glance, and the skip they lead to."""

    model: str
    samples: int
    p5: float | None
    p50: float | None
    p95: float | None
    skip_seconds: float | None  # the skip in use for this model (None: no skip)
    learned: bool  # whether the skip comes from the samples (else from the settings)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between neighbours."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * min(100.0, max(0.0, q)) / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def learn(times: Mapping[str, Sequence[float]], rules: Rules) -> dict[str, Learned]:
    """The learned skip of each model with at least ``rules.learn_min_samples`` observed times.

    Times are ``completed_at - created`` as the daemon saw them (late by up to one poll interval);
    negative ones (clock skew) count as zero. ``learn_min_samples`` 0 turns learning off.
    """
    learned: dict[str, Learned] = {}
    if rules.learn_min_samples <= 0:
        return learned
    for model, observed in times.items():
        if len(observed) < rules.learn_min_samples:
            continue
        clean = [max(0.0, t) for t in observed]
        learned[model] = Learned(quantile(clean, rules.learn_quantile), quantile(clean, 50))
    return learned


def model_times(times: Mapping[str, Sequence[float]], rules: Rules) -> list[ModelTimes]:
    """Per model (sorted by name): sample count, p5/p50/p95 and the skip in use under ``rules``."""
    learned = learn(times, rules)
    rules = dataclasses.replace(rules, learned=learned)
    out = []
    for model in sorted(times):
        observed = [max(0.0, t) for t in times[model]]
        stub = models.Task(task_id="-", model=model)
        out.append(
            ModelTimes(
                model=model,
                samples=len(observed),
                p5=quantile(observed, 5) if observed else None,
                p50=quantile(observed, 50) if observed else None,
                p95=quantile(observed, 95) if observed else None,
                skip_seconds=skip_seconds(stub, rules),
                learned=model in learned and skip_seconds(stub, rules) is not None,
            )
        )
    return out


# --- spending a tight request budget -----------------------------------------------------------


def starving(task: models.Task, now: dt.datetime, rules: Rules) -> bool:
    """Whether a row is overdue by more than its mode's longest interval: it goes first, whatever
    else is due (the no-starvation bound)."""
    if task.next_attempt_at is None:
        return False
    overdue = (now - task.next_attempt_at).total_seconds()
    return overdue > rules.cadence(task.mode).high


def budget_order(tasks: Sequence[models.Task], now: dt.datetime, rules: Rules) -> list[models.Task]:
    """Due rows in the order a tight request budget should serve them.

    0. rows starving (:func:`starving`), longest overdue first;
    1. rows already downloading (a video to save; their download needs no poll);
    2. rows past their expected completion (:func:`expected_ready_at`), nearest deadline first;
    3. the rest, in the claim's order (:data:`models.CLAIM_ORDER`).
    """

    def key(task: models.Task) -> tuple[int, tuple[tuple[bool, dt.datetime], ...]]:
        if starving(task, now, rules):
            return 0, ((False, task.next_attempt_at or _NEVER),)
        if task.state == models.State.DOWNLOADING:
            return 1, models.claim_key(task)
        ready = expected_ready_at(task, rules)
        if ready is not None and ready <= now:
            return 2, models.claim_key(task)
        return 3, models.claim_key(task)

    return sorted(tasks, key=key)


def why_waiting(task: models.Task, now: dt.datetime, rules: Rules) -> str | None:
    """Why an active task is next worked on when ``next_attempt_at`` says, in a person's words:
    waiting on a setting, a back-off after failures, the skip for its model's expected time, or
    its mode's cadence. None for a finished task."""
    if task.is_terminal:
        return None
    error = task.error or ""
    if error.startswith(WAITING_ON_SETTING):
        return error
    due = task.next_attempt_at
    if task.state == models.State.PENDING and task.polls == 0:
        return "new: polled at the next tick" if due is None or due <= now else "new"
    if task.attempts > 0 and error:
        failures = "failure" if task.attempts == 1 else "failures"
        return f"back-off after {task.attempts} {failures} in a row: {error}"
    if task.state == models.State.DOWNLOADING:
        return "downloading" if due is None or due <= now else "download due"
    skip = skip_seconds(task, rules)
    created = task.provider_created_at
    cadence = rules.cadence(task.mode)
    if (
        skip is not None
        and created is not None
        and due is not None
        and task.last_polled_at is not None
        and due > task.last_polled_at + dt.timedelta(seconds=cadence.high)
    ):
        res = resolution(task) or "?"
        return (
            f"the skip: not polled before created + {skip:.0f}s, the shortest time a {res} video "
            f"takes (SEEDANCE_EXPECTED_SECONDS_{res.upper()}, or learned)"
        )
    if due is not None and task.last_polled_at is not None:
        gap = (due - task.last_polled_at).total_seconds()
        if not cadence.low - 1 <= gap <= cadence.high + 1:
            # A daemon with other cadences than these settings (a trial, another replica's):
            # say what the row says, not what these settings would.
            return f"the {task.mode} cadence: {gap:.0f} s after the last poll"
    return f"the {task.mode} cadence: every {cadence} s"


def polling_load(due_soon: int, window_seconds: float, limit_per_second: float) -> float:
    """Needed request rate over the limit: the rows due within ``window_seconds`` (overdue ones
    included) spread over that window, divided by the limit. Above 1 the limit cannot keep up."""
    if window_seconds <= 0 or limit_per_second <= 0:
        return float("inf") if due_soon else 0.0
    return due_soon / window_seconds / limit_per_second


def before_work(
    task: models.Task,
    now: dt.datetime,
    provider_rule: Callable[[str], str | None] | None = None,
) -> models.Task | None:
    """``rejected`` for an id that can never be a provider's (nobody is asked), else None: by the
    rule every id keeps, then by ``provider_rule``, the provider's own (``Provider.task_id_problem``).

    The deadline is not looked at: it orders the work and raises alarms, it never ends a task.
    """
    problem = task_id_problem(task.task_id)
    if problem is None and provider_rule is not None:
        problem = provider_rule(task.task_id)
    if problem is not None:
        return _finish(task, models.State.REJECTED, problem, now)
    return None


def deadline_ahead(task: models.Task, now: dt.datetime) -> bool:
    """Whether the task's deadline (``expires_at``) is still ahead, or unknown."""
    return task.expires_at is None or now < task.expires_at


def well_inside(task: models.Task, now: dt.datetime, rules: Rules) -> bool:
    """Whether the provider should surely still have the task: seen, and its deadline at least as
    far away as a row is at risk (or unknown)."""
    if task.provider_status is None:
        return False
    if task.expires_at is None:
        return True
    return now < task.expires_at - rules.at_risk.span(task.provider)


def _give_up_due(since: dt.datetime, now: dt.datetime, rules: Rules) -> bool:
    """Whether a task created (or inserted) at ``since`` is unfinished past ``give_up_after``."""
    return now - since >= rules.give_up_after


def given_up(task: models.Task, now: dt.datetime, rules: Rules, said: str) -> models.Task | None:
    """``expired`` for a task still unfinished ``rules.give_up_after`` after its creation (its
    insertion, where the provider never said), ``said`` being what the provider last said; else
    None. A task is not polled forever."""
    since = task.provider_created_at or task.inserted_at
    if since is None or not _give_up_due(since, now, rules):
        return None
    days = (now - since).total_seconds() / 86_400
    return _finish(
        task.replace(polls=task.polls + 1, last_polled_at=now),
        models.State.EXPIRED,
        f"{GIVE_UP_REASON} ({rules.give_up_after.total_seconds() / 86_400:g} days): "
        f"{days:.1f} days after it was created the provider's answer was {said}",
        now,
    )


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
        # The provider's own deadline where it knows one, else created + the retention.
        "expires_at": answer.expires_at
        or (deadline(created, rules) if created else task.expires_at),
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
        if (task.error or "").startswith(LINK_REFUSED_PREFIX):
            # A fresh link after refused ones: the count of refusals goes on until one works.
            changes.update(error=task.error, attempts=task.attempts)
    elif answer.gone is not None:
        # The provider's word that the video is gone: expired (the worker looks in the archive).
        changes.update(state=models.State.EXPIRED.value, error=answer.gone, next_attempt_at=now)
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
        # Queued or processing: no poll before the video can possibly be ready. The skip comes from
        # what the answer states (model, resolution), else from what the task already knew.
        stated = answer.model or getattr(answer, "resolution", None)
        source = answer if stated else task
        changes["next_attempt_at"] = not_before_ready(task.mode, created, source, now, rules, draw)
    after = task.replace(**changes)
    # Checked before the task is copied for given_up: one copy less on every poll, which is not
    # past the give-up (bench/README.md, the scale run's profile).
    since = created or task.inserted_at
    if (
        after.state == models.State.POLLING
        and since is not None
        and _give_up_due(since, now, rules)
    ):
        return (
            given_up(task.replace(provider_created_at=created), now, rules, status.value) or after
        )
    return after


def on_poll_error(
    task: models.Task,
    reason: str,
    now: dt.datetime,
    rules: Rules,
    draw: Draw,
    at_least_seconds: float = 0.0,
    *,
    give_up: bool = True,
) -> models.Task:
    """The task after a poll that failed in a way worth retrying (5xx, timeout, an outage, 429).

    Past ``rules.give_up_after`` the task ends ``expired`` (:func:`given_up`), unless ``give_up``
    is False: our own bug is no reason to end a task.
    """
    ended = given_up(task, now, rules, f"an error ({reason})") if give_up else None
    if ended is not None:
        return ended
    attempts = task.attempts + 1
    floor = rules.cadence(task.mode).low
    wait = backoff_seconds(attempts, floor, rules.backoff_cap_seconds, draw)
    wait = max(at_least_seconds, before_deadline(task, wait, floor, now))
    if task.provider_status in (models.Status.QUEUED, models.Status.PROCESSING):
        # A retry is a poll too: not before the video can be ready (the skip).
        wait = max(wait, _seconds_until_ready(task, now, rules))
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
    ended = given_up(task, now, rules, f"malformed ({reason})")
    if ended is not None:
        return ended
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
    """The provider answered its own 404 (DESIGN.md): evidence, not proof.

    ``rules.not_found_polls`` of them in a row, spread over at least the mode's longest interval,
    make a task the provider had answered for ``expired`` and one it never knew ``rejected`` (the
    service looks in the archive first). Until then the task is polled again, never sooner than
    that spread allows: a 404 that comes sooner after the last (a hastened poll) does not count.
    """
    seen = task.provider_status is not None
    return _refused_in_a_row(
        task,
        GONE_REASON if seen else NOT_FOUND_REASON,
        "(its own 404)",
        "its own 404",
        rules.not_found_polls,
        models.State.EXPIRED if seen else models.State.REJECTED,
        now,
        rules,
        draw,
        spread=rules.cadence(task.mode).high,
    )


def on_task_forbidden(
    task: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """A 401/403 that only this task gets (the key is accepted): retry briefly, then ``rejected``.

    The task may belong to another account, or the provider may have withdrawn it; either way it
    must not pause the daemon, and a few polls in a row make sure it was no passing glitch.
    """
    return _refused_in_a_row(
        task,
        FORBIDDEN_REASON,
        f"({reason})",
        reason,
        rules.forbidden_polls,
        models.State.REJECTED,
        now,
        rules,
        draw,
    )


def _refused_in_a_row(
    task: models.Task,
    prefix: str,
    detail: str,
    what: str,
    limit: int,
    verdict: models.State,
    now: dt.datetime,
    rules: Rules,
    draw: Draw,
    spread: float = 0.0,
) -> models.Task:
    """Retry a refusal at the cadence; ``limit`` of the same kind in a row, spread over at least
    ``spread`` seconds, end the task in ``verdict``.

    ``attempts`` counts consecutive failures of any kind; only refusals whose error starts with
    ``prefix`` count towards the verdict, each at least ``spread / (limit - 1)`` after the last.
    """
    ended = given_up(task, now, rules, f"{what}")
    if ended is not None:
        return ended
    gap = spread / max(1, limit - 1)
    previous = task.attempts if (task.error or "").startswith(prefix) else 0
    too_soon = (
        previous > 0
        and task.last_polled_at is not None
        and (now - task.last_polled_at).total_seconds() < gap
    )
    refused = previous if too_soon else previous + 1
    if refused >= limit:
        return _finish(
            task.replace(polls=task.polls + 1, last_polled_at=now, attempts=refused),
            verdict,
            f"{prefix} ({what} on {refused} polls in a row)",
            now,
        )
    return on_poll_error(
        task.replace(attempts=refused - 1), f"{prefix} {detail}", now, rules, draw, gap
    )


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


def on_link_refused(task: models.Task, reason: str, now: dt.datetime, rules: Rules) -> models.Task:
    """The video link was refused (403, 404, 410): poll again for a fresh one.

    When ``rules.link_refusals`` links in a row were refused, each but the first fresh from a new
    poll, the provider no longer serves the video: ``expired`` (the service looks in the archive
    first). The count goes on across the polls in between (:func:`on_answer` keeps it).
    """
    previous = task.attempts if (task.error or "").startswith(LINK_REFUSED_PREFIX) else 0
    refusals = previous + 1
    if refusals >= rules.link_refusals:
        return _finish(
            task.replace(attempts=refusals, video_url=None),
            models.State.EXPIRED,
            f"{LINK_GONE_REASON} ({refusals} links in a row refused, each fresh from a poll; "
            f"the last: {reason.removeprefix(LINK_REFUSED_PREFIX).strip()})",
            now,
        )
    return _poll_for_link(task, f"{reason}; polling for a fresh video_url", refusals, now, rules)


def on_not_a_video(
    task: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """The video host answered 200 with something that is not a video: a transient download error,
    retried; after ``rules.not_a_video_tries`` in a row, poll for a fresh link. Never a verdict."""
    previous = task.attempts if (task.error or "").startswith(errors.NotAVideo.PREFIX) else 0
    tries = previous + 1
    if tries >= rules.not_a_video_tries:
        return _poll_for_link(
            task,
            f"{reason} ({tries} times in a row); polling for a fresh video_url",
            tries,
            now,
            rules,
        )
    return on_download_error(task.replace(attempts=previous), reason, now, rules, draw)


def _poll_for_link(
    task: models.Task, error: str, attempts: int, now: dt.datetime, rules: Rules
) -> models.Task:
    """Back to polling for a fresh video_url, no sooner than the cadence allows."""
    earliest = now
    if task.last_polled_at is not None:
        earliest = max(
            now, task.last_polled_at + dt.timedelta(seconds=rules.cadence(task.mode).low)
        )
    return task.replace(
        state=models.State.POLLING.value,
        video_url=None,
        attempts=attempts,
        error=error,
        next_attempt_at=earliest,
        updated_at=now,
    )


def on_waiting_on_setting(
    task: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """A video our own settings refuse (SEEDANCE_MAX_VIDEO_BYTES, the URL rules): not a verdict.

    The row stays ``downloading`` with the reason, tried again from the mode's longest interval,
    doubling up to ``rules.setting_retry_cap_seconds``, and at every start of a daemon (the
    setting may have changed); until it is archived or the provider deletes the task.
    """
    previous = task.attempts if (task.error or "").startswith(WAITING_ON_SETTING) else 0
    attempts = previous + 1
    floor = rules.cadence(task.mode).high
    wait = backoff_seconds(attempts, floor, max(floor, rules.setting_retry_cap_seconds), draw)
    return task.replace(
        state=models.State.DOWNLOADING.value,
        attempts=attempts,
        error=f"{WAITING_ON_SETTING}: {reason}; tried again in {wait:.0f}s and at every start",
        next_attempt_at=now + dt.timedelta(seconds=wait),
        updated_at=now,
    )


def on_verdict_deferred(
    task: models.Task, verdict: models.Task, reason: str, now: dt.datetime, rules: Rules, draw: Draw
) -> models.Task:
    """``verdict`` (a negative end) could not be checked against the archive: no verdict yet. The
    task stays where it was, with what the poll learnt, and is tried again after a backoff. Its
    error still starts with the verdict's, and its attempts are the verdict's count, so the next
    answer of the same kind gives the verdict again (and the archive another look)."""
    floor = rules.cadence(task.mode).low
    wait = backoff_seconds(max(1, verdict.attempts), floor, rules.backoff_cap_seconds, draw)
    return verdict.replace(
        state=(
            models.State.DOWNLOADING.value
            if task.state == models.State.DOWNLOADING
            else models.State.POLLING.value
        ),
        error=f"{verdict.error}; not given up yet: {reason}; next try in {wait:.0f}s",
        next_attempt_at=now + dt.timedelta(seconds=wait),
        updated_at=now,
    )


def _finish(
    task: models.Task, state: models.State, reason: str | None, now: dt.datetime
) -> models.Task:
    return task.replace(state=state.value, error=reason, updated_at=now, next_attempt_at=now)
