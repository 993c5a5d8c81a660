"""In-memory fakes of the daemon's I/O seams, and a clock that tests move by hand.

They implement the same Protocols as the real store, provider and archive, record their calls, and
never sleep or touch the network, so unit tests of the service run in microseconds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from seedance_archiver import archive, errors, listener, models, outbox, provider, store, utils

EPOCH = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


class MovableClock:
    """A clock (:class:`utils.Clock`) that stands still until a test moves it; its monotonic
    reading moves with it, counted in seconds from its start."""

    def __init__(self, start: dt.datetime = EPOCH) -> None:
        self.now = start
        self._start = start

    def __call__(self) -> dt.datetime:
        return self.now

    def monotonic(self) -> float:
        return (self.now - self._start).total_seconds()

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


def low_draw(low: float, high: float) -> float:
    """A jitter draw that always picks the shortest wait (deterministic tests)."""
    return low


def high_draw(low: float, high: float) -> float:
    return high


class InlineExecutor(concurrent.futures.Executor):
    """Runs each submitted call at once, in the caller's thread: deterministic unit tests."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def in_utc(value: dt.datetime) -> dt.datetime:
    """A time as the database gives it back: the same instant, in UTC. A naive time is refused,
    as the store's column type refuses it (it could be any zone's)."""
    if value.tzinfo is None:
        raise errors.StoreError("naive datetime given; use utils.utcnow()")
    return value.astimezone(dt.UTC)


class _Rows(dict[str, models.Task]):
    """The fake's table, with the database's history triggers (migration 0009): a row whose state,
    provider status or error changes gets a line in ``history``; a row deleted loses its lines."""

    def __init__(self, tasks: Iterable[models.Task]) -> None:
        super().__init__((t.task_id, t) for t in tasks)
        self.history: dict[str, list[models.Move]] = {}

    def __setitem__(self, task_id: str, task: models.Task) -> None:
        old = self.get(task_id)
        super().__setitem__(task_id, task)
        if old is None or (old.state, old.provider_status, old.error) == (
            task.state,
            task.provider_status,
            task.error,
        ):
            return
        at = task.updated_at or EPOCH
        error = task.error[: models.HISTORY_ERROR_CHARS] if task.error is not None else None
        move = models.Move(at, task.state, task.provider_status, task.polls, task.attempts, error)
        self.history.setdefault(task_id, []).append(move)

    def __delitem__(self, task_id: str) -> None:
        super().__delitem__(task_id)
        self.history.pop(task_id, None)


class FakeStore:
    """Every store Protocol (:class:`store.Store`: tasks, heartbeats, the outbox) on a dict: due
    rows, leases, claim order, heartbeats, events.

    ``clock`` stamps rows the fake inserts (``add``), as the database's default does.
    """

    def __init__(
        self, tasks: Iterable[models.Task] = (), clock: Callable[[], dt.datetime] = lambda: EPOCH
    ) -> None:
        self.rows = _Rows(tasks)
        self.clock = clock
        self.saved: list[models.Task] = []
        self.released: list[str] = []
        self.beats: dict[str, store.DaemonBeat] = {}
        self.outbox: dict[int, models.OutboxEvent] = {}
        self.paused: dict[str, models.PausedEndpoint] = {}
        self.closed = False

    def add(self, task_id: str, mode: str = models.Mode.STANDARD.value) -> bool:
        if task_id in self.rows:
            return False
        if mode not in {m.value for m in models.Mode}:  # the table's CHECK
            raise errors.StoreError(f"the database refused the row: mode {mode!r} is not a mode")
        now = self.clock()
        self.rows[task_id] = models.Task(
            task_id=task_id, mode=mode, inserted_at=now, updated_at=now, next_attempt_at=now
        )
        return True

    def get(self, task_id: str) -> models.Task | None:
        return self.rows.get(task_id)

    def history(self, task_id: str) -> list[models.Move]:
        return list(self.rows.history.get(task_id, ()))

    def hasten(
        self,
        task_ids: Iterable[str],
        now: dt.datetime,
        provider_name: str,
        cadences: Mapping[str, models.Cadence],
    ) -> int:
        moved = 0
        for task_id in set(task_ids):
            task = self.rows.get(task_id)
            if (
                task is None
                or task.is_terminal
                or task.provider not in (None, provider_name)
                or task.next_attempt_at is None
                or (task.lease_expires_at is not None and task.lease_expires_at >= now)
            ):
                continue
            at = models.hastened_poll_at(task.mode, task.last_polled_at, now, cadences)
            if task.next_attempt_at > at:
                self.rows[task_id] = task.replace(next_attempt_at=at)
                moved += 1
        return moved

    def wake_waiting_on_settings(self, now: dt.datetime, provider_name: str) -> int:
        woken = 0
        for task in list(self.rows.values()):
            if (
                task.state == models.State.DOWNLOADING
                and (task.error or "").startswith(models.WAITING_ON_SETTING + ":")
                and task.provider in (None, provider_name)
                and task.next_attempt_at is not None
                and task.next_attempt_at > now
                and (task.lease_expires_at is None or task.lease_expires_at < now)
            ):
                self.rows[task.task_id] = task.replace(next_attempt_at=now)
                woken += 1
        return woken

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in models.State}
        for task in self.rows.values():
            counts[task.state] += 1
        return counts

    def retry(self, task_id: str, now: dt.datetime, *, force: bool = False) -> store.RetryOutcome:
        task = self.rows.get(task_id)
        if task is None:
            return store.RetryOutcome.NO_SUCH_TASK
        if task.lease_expires_at is not None and task.lease_expires_at >= now:
            return store.RetryOutcome.LEASED
        if task.state == models.State.ARCHIVED and not force:
            return store.RetryOutcome.ARCHIVED
        self.rows[task_id] = task.replace(
            state=models.State.POLLING.value,
            next_attempt_at=now,
            attempts=0,
            updated_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
        return store.RetryOutcome.RETRIED

    def prune(
        self, finished_before: dt.datetime, batch: int = 5000, *, keep_undelivered: bool = False
    ) -> int:
        unsent = {
            e.task_id
            for e in self.outbox.values()
            if e.state in (models.Delivery.PENDING, models.Delivery.FAILED)
        }
        doomed = [
            t.task_id
            for t in self.rows.values()
            if t.is_terminal
            and t.updated_at is not None
            and t.updated_at < finished_before
            and not (keep_undelivered and t.task_id in unsent)
        ]
        for task_id in doomed:
            del self.rows[task_id]
        self.outbox = {i: e for i, e in self.outbox.items() if e.task_id not in doomed}
        return len(doomed)

    def beat(self, beat: store.DaemonBeat) -> None:
        self.beats[beat.owner] = beat

    def forget_daemon(self, owner: str) -> None:
        self.beats.pop(owner, None)

    def daemons(self) -> list[store.DaemonBeat]:
        never = dt.datetime.min.replace(tzinfo=dt.UTC)
        return sorted(self.beats.values(), key=lambda b: b.last_tick_at or never, reverse=True)

    def ping(self) -> None:
        if self.closed:
            raise errors.StoreError("the fake store is closed")

    def check_schema(self) -> None:
        self.ping()

    def listener(self, on_notify: Callable[[], None]) -> listener.Listener | None:
        return None

    def close(self) -> None:
        self.closed = True

    def claim_due(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        states: Iterable[str] | None = None,
        provider_name: str | None = None,
    ) -> list[models.Task]:
        wanted = None if states is None else set(states)
        now = in_utc(now)
        lease_until = now + dt.timedelta(seconds=lease_seconds)
        due = [
            t
            for t in self.rows.values()
            if not t.is_terminal
            and (wanted is None or t.state in wanted)
            and (provider_name is None or t.provider in (None, provider_name))
            and t.next_attempt_at is not None
            and t.next_attempt_at <= now
            and (t.lease_expires_at is None or t.lease_expires_at < now)
        ]
        due.sort(key=models.claim_key)
        return self._lease(due[: max(0, limit)], owner, lease_until)

    def _lease(
        self, tasks: Iterable[models.Task], owner: str, until: dt.datetime
    ) -> list[models.Task]:
        claimed = []
        for task in tasks:
            leased = task.replace(lease_owner=owner, lease_expires_at=until)
            self.rows[task.task_id] = leased
            # A lease still set on a free row ran out (SqlStore._lease_stmt).
            claimed.append(
                dataclasses.replace(leased, taken_over=task.lease_expires_at is not None)
            )
        return claimed

    def claim_overdue(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        due_before: Mapping[str, dt.datetime],
        provider_name: str | None = None,
    ) -> list[models.Task]:
        lease_until = now + dt.timedelta(seconds=lease_seconds)
        due = [
            t
            for t in self.rows.values()
            if t.state in (models.State.PENDING, models.State.POLLING)
            and (provider_name is None or t.provider in (None, provider_name))
            and t.mode in due_before
            and t.next_attempt_at is not None
            and t.next_attempt_at < due_before[t.mode]
            and (t.lease_expires_at is None or t.lease_expires_at < now)
        ]
        due.sort(key=lambda t: t.next_attempt_at or EPOCH)
        return self._lease(due[: max(0, limit)], owner, lease_until)

    def save(self, tasks: Sequence[models.Task], owner: str) -> int:
        written = 0
        for task in tasks:
            current = self.rows.get(task.task_id)
            if current is None or current.lease_owner != owner:
                continue
            # Only the daemon's columns, as SqlStore writes them: the feeder's stay as they are.
            written_fields = {name: getattr(task, name) for name in models.DAEMON_FIELDS}
            try:
                for name, value in written_fields.items():
                    if isinstance(value, dt.datetime):
                        written_fields[name] = in_utc(value)
            except errors.StoreError:
                continue  # the one row is refused; the rest of the batch is written
            self.rows[task.task_id] = current.replace(**written_fields).replace(
                lease_owner=None, lease_expires_at=None
            )
            self.saved.append(task)
            written += 1
            if task.is_terminal and current.state != task.state:  # what the trigger does
                self._event(task, models.Event(f"task.{task.state}"), self.clock())
        return written

    def _event(self, task: models.Task, event: models.Event, now: dt.datetime) -> None:
        event_id = max(self.outbox, default=0) + 1
        self.outbox[event_id] = models.OutboxEvent(
            id=event_id,
            webhook_id=outbox.new_webhook_id(),
            task_id=task.task_id,
            event=event.value,
            payload=models.event_payload(task),
            created_at=now,
            next_attempt_at=now,
        )

    def add_at_risk_events(
        self, now: dt.datetime, limit: int = 1000, at_risk: models.AtRisk = models.AT_RISK_HOUR
    ) -> int:
        warned = {e.task_id for e in self.outbox.values() if e.event == models.Event.AT_RISK}
        doomed = sorted(
            (
                t
                for t in self.rows.values()
                if not t.is_terminal and at_risk.test(t, now) and t.task_id not in warned
            ),
            key=lambda t: t.expires_at or EPOCH,
        )[:limit]
        for task in doomed:
            self._event(task, models.Event.AT_RISK, now)
        return len(doomed)

    def claim_webhooks(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        url: str | None = None,
    ) -> list[models.OutboxEvent]:
        if url in self.paused:
            return []
        due = sorted(
            (
                e
                for e in self.outbox.values()
                if e.state == models.Delivery.PENDING
                and e.next_attempt_at is not None
                and e.next_attempt_at <= now
                and (e.lease_expires_at is None or e.lease_expires_at < now)
            ),
            key=lambda e: (e.next_attempt_at or EPOCH, e.id),
        )[: max(0, limit)]
        until = now + dt.timedelta(seconds=lease_seconds)
        claimed = []
        for event in due:
            self.outbox[event.id] = dataclasses.replace(
                event, lease_owner=owner, lease_expires_at=until
            )
            claimed.append(self.outbox[event.id])
        return claimed

    def record_webhook(self, event: models.OutboxEvent, owner: str) -> bool:
        current = self.outbox.get(event.id)
        if current is None:
            return False
        delivered = event.state == models.Delivery.DELIVERED
        if current.lease_owner != owner and not (
            delivered and current.state == models.Delivery.PENDING
        ):
            return False
        self.outbox[event.id] = dataclasses.replace(event, lease_owner=None, lease_expires_at=None)
        return True

    def record_webhooks(self, events: Sequence[models.OutboxEvent], owner: str) -> int:
        return sum(self.record_webhook(event, owner) for event in events)

    def release_webhooks(self, owner: str) -> int:
        mine = [
            e
            for e in self.outbox.values()
            if e.lease_owner == owner and e.state == models.Delivery.PENDING
        ]
        for event in mine:
            self.outbox[event.id] = dataclasses.replace(
                event, lease_owner=None, lease_expires_at=None
            )
        return len(mine)

    def webhook_backlog(self) -> outbox.WebhookBacklog:
        pending = [e for e in self.outbox.values() if e.state == models.Delivery.PENDING]
        given_up = sum(
            1
            for e in self.outbox.values()
            if e.state in (models.Delivery.FAILED, models.Delivery.DISABLED)
            and e.last_error != outbox.DISCARDED
        )
        oldest = min((e.created_at for e in pending), default=None)
        return outbox.WebhookBacklog(len(pending), oldest, given_up, len(self.paused))

    def pause_webhook_endpoint(self, url: str, reason: str, now: dt.datetime) -> bool:
        if url in self.paused:
            return False
        self.paused[url] = models.PausedEndpoint(url, now, reason)
        return True

    def resume_webhook_endpoints(self, url: str | None = None) -> list[str]:
        resumed = sorted(self.paused if url is None else {url} & self.paused.keys())
        for each in resumed:
            del self.paused[each]
        return resumed

    def paused_webhook_endpoints(self) -> list[models.PausedEndpoint]:
        return sorted(self.paused.values(), key=lambda p: (p.paused_at, p.url))

    def webhooks(
        self, failed: bool = False, limit: int | None = None, *, task_id: str | None = None
    ) -> list[models.OutboxEvent]:
        gave_up = (models.Delivery.FAILED, models.Delivery.DISABLED)
        events = [
            e
            for _, e in sorted(self.outbox.items(), reverse=True)
            if (not failed or e.state in gave_up) and task_id in (None, e.task_id)
        ]
        return events if limit is None else events[:limit]

    def redeliver_webhook(self, event_id: int, now: dt.datetime) -> bool:
        event = self.outbox.get(event_id)
        if event is None:
            return False
        self.outbox[event_id] = dataclasses.replace(
            event,
            state=models.Delivery.PENDING.value,
            next_attempt_at=now,
            attempts=0,
            delivered_at=None,
            lease_owner=None,
            lease_expires_at=None,
        )
        return True

    def discard_webhooks(self, before: dt.datetime, now: dt.datetime) -> int:
        doomed = [
            e
            for e in self.outbox.values()
            if e.state == models.Delivery.PENDING
            and e.created_at < before
            and (e.lease_expires_at is None or e.lease_expires_at < now)
        ]
        for event in doomed:
            self.outbox[event.id] = dataclasses.replace(
                event,
                state=models.Delivery.DISABLED.value,
                last_error=outbox.DISCARDED,
                lease_owner=None,
                lease_expires_at=None,
            )
        return len(doomed)

    def renew(
        self, owner: str, task_ids: Iterable[str], now: dt.datetime, lease_seconds: float
    ) -> set[str]:
        held = set()
        for task_id in task_ids:
            task = self.rows.get(task_id)
            if task is not None and task.lease_owner == owner:
                until = now + dt.timedelta(seconds=lease_seconds)
                self.rows[task_id] = task.replace(lease_expires_at=until)
                held.add(task_id)
        return held

    def leased(self, task_ids: Iterable[str], now: dt.datetime) -> set[str]:
        return {
            i
            for i in task_ids
            if (t := self.rows.get(i)) is not None
            and t.lease_owner is not None
            and t.lease_expires_at is not None
            and t.lease_expires_at >= now
        }

    def summary(
        self, now: dt.datetime, at_risk: models.AtRisk = models.AT_RISK_HOUR
    ) -> store.Summary:
        counts = self.counts()
        risky = sum(1 for t in self.rows.values() if not t.is_terminal and at_risk.test(t, now))
        pending = sorted(
            (t for t in self.rows.values() if t.state == models.State.PENDING.value),
            key=lambda t: t.inserted_at or EPOCH,
        )
        due_soon = sum(
            1
            for t in self.rows.values()
            if t.state in (models.State.PENDING, models.State.POLLING)
            and t.next_attempt_at is not None
            and t.next_attempt_at <= now + store.LOAD_WINDOW
        )
        waiting = sum(
            1
            for t in self.rows.values()
            if t.state == models.State.DOWNLOADING
            and (t.error or "").startswith(models.WAITING_ON_SETTING + ":")
        )
        return store.Summary(counts, risky, pending[0] if pending else None, due_soon, waiting)

    def generation_times(self, since: dt.datetime, per_model: int) -> dict[str, list[float]]:
        done = sorted(
            (
                t
                for t in self.rows.values()
                if t.model is not None
                and t.provider_created_at is not None
                and t.completed_at is not None
                and t.completed_at >= since
            ),
            key=lambda t: t.completed_at or EPOCH,
            reverse=True,
        )
        times: dict[str, list[float]] = {}
        for t in done:
            assert t.model is not None and t.completed_at and t.provider_created_at
            kept = times.setdefault(t.model, [])
            if len(kept) < per_model:
                kept.append((t.completed_at - t.provider_created_at).total_seconds())
        return {m: v for m, v in times.items() if v}

    def at_risk_tasks(
        self, now: dt.datetime, at_risk: models.AtRisk, limit: int
    ) -> list[models.Task]:
        risky = [t for t in self.rows.values() if not t.is_terminal and at_risk.test(t, now)]
        return sorted(risky, key=lambda t: t.expires_at or EPOCH)[:limit]

    # Last: below it, ``list`` in an annotation would mean this method.
    def list(
        self,
        state: str | None = None,
        limit: int | None = None,
        *,
        mode: str | None = None,
        provider: str | None = None,
        before: tuple[dt.datetime, str] | None = None,
    ) -> list[models.Task]:
        def order(task: models.Task) -> tuple[dt.datetime, str]:
            return (task.inserted_at or EPOCH, task.task_id)

        rows = [
            t
            for t in sorted(self.rows.values(), key=order, reverse=True)
            if state in (None, t.state)
            and mode in (None, t.mode)
            and provider in (None, t.provider)
            and (before is None or order(t) < (in_utc(before[0]), before[1]))
        ]
        return rows if limit is None else rows[:limit]

    def release(self, owner: str, task_ids: Iterable[str]) -> int:
        n = 0
        for task_id in task_ids:
            task = self.rows.get(task_id)
            if task is not None and task.lease_owner == owner:
                self.rows[task_id] = task.replace(lease_owner=None, lease_expires_at=None)
                self.released.append(task_id)
                n += 1
        return n


Reply = models.Answer | Exception


class FakeProvider:
    """Answers each task's polls from a script; serves videos from memory; records every call."""

    def __init__(self, name: str = "reseller") -> None:
        self.name = name
        self.scripts: dict[str, list[Reply]] = {}
        self.videos: dict[str, bytes | Exception] = {}
        self.fetches: list[str] = []
        self.downloads: list[str] = []
        # The Content-Type every video is served with (checked as the real client checks it).
        self.content_type = "video/mp4"
        # What check_key answers: True (accepted), False (rejected) or None (can't tell).
        self.key_ok: bool | None = True
        self.key_checks = 0
        # The provider's own id rule (Provider.task_id_problem); None accepts every valid id.
        self.id_rule: Callable[[str], str | None] | None = None

    def script(self, task_id: str, *replies: Reply) -> None:
        """The replies to the next polls of ``task_id``; the last one repeats."""
        self.scripts[task_id] = list(replies)

    async def fetch(self, task_id: str) -> models.Answer:
        self.fetches.append(task_id)
        replies = self.scripts.get(task_id)
        if not replies:
            raise errors.TaskNotFound("the provider does not know this task (HTTP 404)")
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def check_key(self) -> bool | None:
        self.key_checks += 1
        return self.key_ok

    def task_id_problem(self, task_id: str) -> str | None:
        return self.id_rule(task_id) if self.id_rule is not None else None

    @contextlib.asynccontextmanager
    async def open_video(self, task: models.Task) -> AsyncIterator[provider.Video]:
        if task.video_url is None:
            # As the real client: no link to refuse, so not LinkExpired (which means poll again).
            raise errors.DownloadError("the task has no video_url")
        url = task.video_url
        self.downloads.append(url)
        body = self.videos.get(url)
        if body is None:
            raise errors.LinkExpired("the video link was refused (HTTP 404)")
        if isinstance(body, Exception):
            raise body
        data = body
        provider.check_video(self.content_type, data[: provider.VIDEO_HEAD_BYTES])

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 64 * 1024):
                yield data[start : start + 64 * 1024]

        yield provider.Video(length=len(data), chunks=chunks())

    async def aclose(self) -> None:
        pass


# An MP4's first box (ftyp, 24 bytes): what a download must start with to count as a video.
MP4_FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41"


def mp4(payload: bytes) -> bytes:
    """``payload`` made MP4-shaped (an ftyp box first), as every video the fakes serve must be."""
    return MP4_FTYP + payload


def answer(
    task_id: str,
    status: str = "processing",
    *,
    created: dt.datetime = EPOCH,
    video_url: str | None = None,
    error: str | None = None,
    duration: float | None = None,
    resolution: str | None = None,
    expires_at: dt.datetime | None = None,
) -> models.Answer:
    """A provider answer for tests, with the seed's defaults."""
    return models.Answer(
        id=task_id,
        status=models.Status(status),
        created=created,
        model="seedance_1_5_pro_720p",
        video_url=video_url,
        actual_duration=duration,
        error=error,
        resolution=resolution,
        expires_at=expires_at,
    )


@dataclasses.dataclass
class FakeArchive:
    """Committed videos in a dict; ``fail_next`` makes the next put raise."""

    objects: dict[str, bytes] = dataclasses.field(default_factory=dict)
    puts: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    fail_next: Exception | None = None
    # Unfinished uploads left behind (as a killed process would leave them): the task id and when
    # each began (leave_unfinished).
    unfinished: list[tuple[str, dt.datetime]] = dataclasses.field(default_factory=list)
    discarded: list[str] = dataclasses.field(default_factory=list)
    # Objects stored without their SHA-256 recorded (a store that refused the tag): found only when
    # read back.
    untagged: set[str] = dataclasses.field(default_factory=set)
    finds: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
    find_fails: Exception | None = None  # every find raises this (an unreachable store)

    async def find(self, task_id: str, *, read_back: bool = False) -> archive.Stored | None:
        self.finds.append((task_id, read_back))
        if self.find_fails is not None:
            raise self.find_fails
        data = self.objects.get(task_id)
        if data is None or (task_id in self.untagged and not read_back):
            return None
        return archive.Stored(f"mem://{task_id}.mp4", len(data), hashlib.sha256(data).hexdigest())

    async def put(
        self,
        task_id: str,
        chunks: AsyncIterator[bytes],
        expected_size: int | None,
        metadata: Mapping[str, str] | None = None,
        *,
        leftovers: bool = True,
    ) -> archive.Stored:
        self.puts.append(task_id)
        if leftovers:  # as the folder does; S3 before a multipart one
            await self.discard_incomplete(task_id)
        self.metadata[task_id] = dict(metadata or {})
        data = b"".join([chunk async for chunk in chunks])
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        counted = archive.Counter()  # the real stores' check, and its message
        counted.add(data)
        counted.verify(expected_size)
        self.objects[task_id] = data
        return archive.Stored(f"mem://{task_id}.mp4", len(data), hashlib.sha256(data).hexdigest())

    async def check(self) -> None:
        pass

    def leave_unfinished(self, task_id: str, started_at: dt.datetime | None = None) -> None:
        """An upload of ``task_id`` left unfinished, begun at ``started_at``: by default now, by the
        wall clock, as a folder's file time and S3's ``Initiated`` are (a test on a moved clock
        passes its own time)."""
        self.unfinished.append((task_id, started_at or utils.utcnow()))

    async def incomplete(self) -> set[str]:
        return {task_id for task_id, _ in self.unfinished}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        # As the real stores: an upload begun at or after ``started_before`` may be a live one.
        doomed = [
            upload
            for upload in self.unfinished
            if upload[0] == task_id and (started_before is None or upload[1] < started_before)
        ]
        self.unfinished = [upload for upload in self.unfinished if upload not in doomed]
        self.discarded.extend(task_id for _ in doomed)
        return len(doomed)

    def link(self, uri: str, expires_seconds: int) -> str:
        return f"{uri}?expires={expires_seconds}"


# mypy holds each fake to the whole of the Protocol it stands in for.
_FAKES: tuple[type[store.Store], type[provider.Provider], type[archive.Archive]] = (
    FakeStore,
    FakeProvider,
    FakeArchive,
)
