"""The webhook outbox's behaviour, once, over every store: the fake, SQLite and PostgreSQL
(``any_store``: the outbox lives on the store, and ``testing.FakeStore`` is an ``OutboxStore`` and
an ``OutboxAdmin`` as ``SqlStore`` is).

An event is written by the move that ends a task (a trigger on SQL, ``save`` on the fake) or by
``add_at_risk_events``; the deliverer claims due events under a lease, records each attempt's
outcome (:func:`webhooks.outcome`: delivered, retried later, given up on) and gives back what it
holds when it stops; the operator lists, redelivers and discards; prune takes events with their rows.

As in the store's contract, no test moves time past a live lease (PostgreSQL's leases follow its
own clock): a lease that has run out is one taken for 0 seconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest
from seedance_archiver import models, outbox, store, utils, webhooks

A, B = "deliverer-a", "deliverer-b"
OWNER = "contract-daemon"
LEASE_S = 60.0
# How far a lease's end may be from the one asked for: PostgreSQL's clock and ours share a host.
CLOCKS_AGREE = dt.timedelta(seconds=30)
SIGNED = "https://cdn.example/v.mp4?X-Signature=secret"
GONE_URL = "https://hooks.example/a"
OTHER_URL = "https://hooks.example/b"


def exact(low: float, high: float) -> float:
    """A jitter draw of none: each delay of the retry schedule is exactly its base."""
    return (low + high) / 2


def finish(any_store: store.Store, task_id: str, state: str, **changes: object) -> models.Task:
    """Add a task, claim it and save it in ``state``, as the daemon does; the row saved."""
    any_store.add(task_id)
    [task] = [
        t for t in any_store.claim_due(OWNER, utils.utcnow(), 60, 100) if t.task_id == task_id
    ]
    done = task.replace(state=state, updated_at=utils.utcnow(), **changes)
    assert any_store.save([done], OWNER) == 1
    return done


def one_event(any_store: store.Store, task_id: str = "video_a") -> models.OutboxEvent:
    """A task that ended archived: its one event, pending and free."""
    finish(any_store, task_id, "archived")
    [event] = [e for e in any_store.webhooks() if e.task_id == task_id]
    return event


def attempt(event: models.OutboxEvent, status: int | None, now: dt.datetime) -> models.OutboxEvent:
    """The event after one attempt that got ``status`` (None: no answer), by the retry schedule."""
    answer = webhooks.Answer(status, error=None if status else "connection refused")
    return webhooks.outcome(event, answer, now, draw=exact)


class TestEnqueue:
    """A move into a terminal state writes one event, in the move; nothing else writes one."""

    @pytest.mark.parametrize("state", sorted(s.value for s in models.TERMINAL_STATES))
    def test_each_terminal_state_writes_its_event(self, any_store: store.Store, state: str) -> None:
        created = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
        archived = state == models.State.ARCHIVED
        before = utils.utcnow()
        finish(
            any_store,
            "video_a",
            state,
            model="seedance-1.5",
            video_url=SIGNED,
            provider_created_at=created,
            archive_uri="s3://b/video_a.mp4" if archived else None,
            archive_sha256="ab" * 32 if archived else None,
        )
        [event] = any_store.webhooks()
        assert (event.task_id, event.event, event.state) == ("video_a", f"task.{state}", "pending")
        assert event.webhook_id.startswith("msg_") and len(event.webhook_id) == 36
        assert event.attempts == 0 and event.lease_owner is None
        assert event.next_attempt_at is not None and event.next_attempt_at >= event.created_at
        assert abs(event.created_at - before) < dt.timedelta(seconds=30)
        payload = json.loads(event.payload)
        assert set(payload) == set(models.EVENT_FIELDS)
        assert payload["task_id"] == "video_a" and payload["state"] == state
        assert payload["provider_created_at"] == "2026-12-01T10:00:00.123Z"
        assert "secret" not in event.payload  # never the signed link

    def test_the_payload_is_the_daemons_own_rendering(self, any_store: store.Store) -> None:
        """The trigger (SQL) and task.at_risk (Python) write the same fields in the same forms."""
        created = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
        finish(any_store, "video_a", "archived", provider_created_at=created, archive_bytes=7)
        [event] = any_store.webhooks()
        task = any_store.get("video_a")
        assert task is not None
        written = json.loads(event.payload)
        rendered = json.loads(models.event_payload(task))
        # inserted_at: stored by the database to the microsecond, rendered to the millisecond.
        assert written.pop("inserted_at")[:19] == rendered.pop("inserted_at")[:19]
        assert written == rendered

    def test_no_event_without_a_move_into_a_terminal_state(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "polling")
        finish(any_store, "video_b", "downloading")
        assert any_store.webhooks() == []
        assert any_store.webhook_backlog() == outbox.WebhookBacklog(0, None, 0)

    def test_a_retried_task_that_ends_again_gets_a_new_event(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "failed")
        assert any_store.retry("video_a", utils.utcnow(), force=True) is store.RetryOutcome.RETRIED
        [task] = any_store.claim_due(OWNER, utils.utcnow(), 60, 10)
        assert any_store.save([task.replace(state="archived")], OWNER) == 1
        events = any_store.webhooks()
        assert [e.event for e in events] == ["task.archived", "task.failed"]
        assert len({e.webhook_id for e in events}) == 2


class TestAtRisk:
    """task.at_risk: once per task, while its deadline is under models.AT_RISK away."""

    def test_written_once_per_task(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        finish(any_store, "video_near", "polling", expires_at=now + dt.timedelta(minutes=30))
        finish(any_store, "video_far", "polling", expires_at=now + dt.timedelta(hours=5))
        assert any_store.add_at_risk_events(now) == 1
        assert any_store.add_at_risk_events(now) == 0
        [event] = any_store.webhooks()
        assert (event.task_id, event.event) == ("video_near", "task.at_risk")
        assert json.loads(event.payload)["state"] == "polling"

    def test_nearest_deadline_first_up_to_the_limit(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        for minutes in (40, 10, 20):
            expires = now + dt.timedelta(minutes=minutes)
            finish(any_store, f"video_{minutes}", "polling", expires_at=expires)
        assert any_store.add_at_risk_events(now, limit=2) == 2
        assert sorted(e.task_id for e in any_store.webhooks()) == ["video_10", "video_20"]
        assert any_store.add_at_risk_events(now, limit=2) == 1

    def test_finished_rows_are_never_warned(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        soon = now + dt.timedelta(minutes=30)
        for state in sorted(models.TERMINAL_STATES):
            finish(any_store, f"video_{state}", state.value, expires_at=soon)
        finish(any_store, "video_polling", "polling", expires_at=soon)
        assert any_store.add_at_risk_events(now) == 1
        warned = [e.task_id for e in any_store.webhooks() if e.event == "task.at_risk"]
        assert warned == ["video_polling"]


class TestClaim:
    """claim_webhooks leases due, pending, free events to one deliverer, oldest due first."""

    def test_due_events_oldest_first_up_to_the_limit(self, any_store: store.Store) -> None:
        for task_id in ("video_1", "video_2", "video_3"):
            finish(any_store, task_id, "failed")
        now = utils.utcnow()
        assert any_store.claim_webhooks(A, now, LEASE_S, 0) == []
        first = any_store.claim_webhooks(A, now, LEASE_S, 2)
        assert [e.task_id for e in first] == ["video_1", "video_2"]
        for event in first:
            assert event.lease_owner == A and event.lease_expires_at is not None
            leased_for = event.lease_expires_at - now
            assert abs(leased_for - dt.timedelta(seconds=LEASE_S)) < CLOCKS_AGREE
        assert [e.task_id for e in any_store.claim_webhooks(A, now, LEASE_S, 10)] == ["video_3"]

    def test_a_claimed_event_is_exclusive_until_recorded(self, any_store: store.Store) -> None:
        event = one_event(any_store)
        now = utils.utcnow()
        [claimed] = any_store.claim_webhooks(A, now, LEASE_S, 10)
        assert claimed.id == event.id
        assert any_store.claim_webhooks(A, now, LEASE_S, 10) == []
        assert any_store.claim_webhooks(B, now, LEASE_S, 10) == []
        assert any_store.webhook_backlog().pending == 1  # held, still to deliver

    def test_a_lease_that_ran_out_is_taken_over(self, any_store: store.Store) -> None:
        one_event(any_store)
        now = utils.utcnow()
        [lost] = any_store.claim_webhooks(A, now, 0, 10)
        later = now + dt.timedelta(seconds=1)
        [taken] = any_store.claim_webhooks(B, later, LEASE_S, 10)
        assert (taken.id, taken.lease_owner) == (lost.id, B)
        # The first deliverer's late failure is not written over the second's attempt.
        assert not any_store.record_webhook(attempt(lost, 500, later), A)
        assert any_store.record_webhook(attempt(taken, 500, later), B)
        [event] = any_store.webhooks()
        assert (event.attempts, event.lease_owner) == (1, None)

    def test_a_clean_stop_gives_back_what_it_holds(self, any_store: store.Store) -> None:
        event = one_event(any_store)
        now = utils.utcnow()
        any_store.claim_webhooks(A, now, LEASE_S, 10)
        assert any_store.release_webhooks(B) == 0
        assert any_store.release_webhooks(A) == 1
        [again] = any_store.claim_webhooks(B, now, LEASE_S, 10)
        assert dataclasses.replace(again, lease_owner=None, lease_expires_at=None) == event


class TestRecord:
    """record_webhooks writes each attempt's outcome and frees the event, only for its holder."""

    def test_a_delivered_event_is_done(self, any_store: store.Store) -> None:
        event = one_event(any_store)
        now = utils.utcnow()
        [claimed] = any_store.claim_webhooks(A, now, LEASE_S, 10)
        assert any_store.record_webhooks([attempt(claimed, 204, now)], A) == 1
        [done] = any_store.webhooks()
        assert (done.state, done.attempts, done.last_status) == ("delivered", 1, 204)
        assert done.delivered_at == now and done.lease_owner is None
        assert done.webhook_id == event.webhook_id
        assert any_store.claim_webhooks(A, now + dt.timedelta(days=9), LEASE_S, 10) == []
        assert any_store.webhook_backlog() == outbox.WebhookBacklog(0, None, 0)

    def test_a_delivery_is_recorded_even_after_the_lease_was_lost(
        self, any_store: store.Store
    ) -> None:
        """The receiver has it: recording it spares a duplicate."""
        one_event(any_store)
        now = utils.utcnow()
        [lost] = any_store.claim_webhooks(A, now, 0, 10)
        later = now + dt.timedelta(seconds=1)
        any_store.claim_webhooks(B, later, LEASE_S, 10)
        assert any_store.record_webhook(attempt(lost, 200, later), A)
        assert [e.state for e in any_store.webhooks()] == ["delivered"]
        assert any_store.claim_webhooks(B, later, 0, 10) == []

    def test_a_stranger_records_nothing(self, any_store: store.Store) -> None:
        before = one_event(any_store)
        now = utils.utcnow()
        [claimed] = any_store.claim_webhooks(A, now, LEASE_S, 10)
        assert any_store.record_webhooks([attempt(claimed, 500, now)], B) == 0
        assert any_store.webhooks() == [claimed]
        assert not any_store.record_webhook(attempt(before, 500, now), B)

    def test_a_batch_writes_only_the_holders_events(self, any_store: store.Store) -> None:
        for task_id in ("video_1", "video_2", "video_3"):
            finish(any_store, task_id, "failed")
        now = utils.utcnow()
        mine = any_store.claim_webhooks(A, now, LEASE_S, 2)
        theirs = any_store.claim_webhooks(B, now, LEASE_S, 2)
        outcomes = [attempt(e, 500, now) for e in [*mine, *theirs]]
        assert any_store.record_webhooks(outcomes, A) == 2
        held = {e.task_id: (e.attempts, e.lease_owner) for e in any_store.webhooks()}
        assert held == {"video_1": (1, None), "video_2": (1, None), "video_3": (0, B)}


class TestRetryAndGiveUp:
    """A failed attempt waits its back-off; when the schedule runs out the event is given up on."""

    def test_a_failed_attempt_is_due_again_after_its_back_off(self, any_store: store.Store) -> None:
        one_event(any_store)
        now = utils.utcnow()
        [event] = any_store.claim_webhooks(A, now, LEASE_S, 10)
        for attempts in (1, 2, 3):
            failed = attempt(event, 503, now)
            back_off = dt.timedelta(seconds=webhooks.RETRY_SCHEDULE_SECONDS[attempts])
            assert failed.next_attempt_at == now + back_off
            assert any_store.record_webhook(failed, A)
            assert any_store.claim_webhooks(A, now + back_off / 2, LEASE_S, 10) == []
            now += back_off
            [event] = any_store.claim_webhooks(A, now, LEASE_S, 10)
            assert (event.attempts, event.last_status) == (attempts, 503)
            assert event.last_error == "HTTP 503"
        backlog = any_store.webhook_backlog()
        assert (backlog.pending, backlog.given_up) == (1, 0)
        assert backlog.oldest_pending_at == event.created_at
        assert backlog.oldest_pending_at is not None and backlog.oldest_pending_at.tzinfo

    def test_the_last_failure_gives_up(self, any_store: store.Store) -> None:
        one_event(any_store)
        now = utils.utcnow()
        [event] = any_store.claim_webhooks(A, now, LEASE_S, 10)
        last = dataclasses.replace(event, attempts=len(webhooks.RETRY_SCHEDULE_SECONDS) - 1)
        given_up = attempt(last, None, now)
        assert given_up.state == models.Delivery.FAILED
        assert any_store.record_webhook(given_up, A)
        [failed] = any_store.webhooks(failed=True)
        assert (failed.id, failed.state, failed.last_error) == (
            event.id,
            "failed",
            "connection refused",
        )
        assert any_store.claim_webhooks(A, now + dt.timedelta(days=30), LEASE_S, 10) == []
        assert any_store.webhook_backlog() == outbox.WebhookBacklog(0, None, 1)

    def test_only_given_up_events_are_listed_as_failed(self, any_store: store.Store) -> None:
        for task_id in ("video_1", "video_2", "video_3"):
            finish(any_store, task_id, "failed")
        now = utils.utcnow()
        claimed = {e.task_id: e for e in any_store.claim_webhooks(A, now, LEASE_S, 10)}
        outcomes = [
            attempt(claimed["video_1"], 200, now),
            dataclasses.replace(claimed["video_2"], state="disabled", attempts=1, last_status=410),
        ]
        assert any_store.record_webhooks(outcomes, A) == 2
        assert [e.task_id for e in any_store.webhooks()] == ["video_3", "video_2", "video_1"]
        assert [e.task_id for e in any_store.webhooks(limit=1)] == ["video_3"]
        assert [e.task_id for e in any_store.webhooks(failed=True)] == ["video_2"]
        assert any_store.webhook_backlog().given_up == 1


class TestRedeliver:
    """redeliver sends an event again now, under the same webhook-id, whatever became of it."""

    @pytest.mark.parametrize("status", [200, None], ids=["delivered", "given-up"])
    def test_an_event_is_sent_again_under_its_webhook_id(
        self, any_store: store.Store, status: int | None
    ) -> None:
        event = one_event(any_store)
        now = utils.utcnow()
        [claimed] = any_store.claim_webhooks(A, now, LEASE_S, 10)
        spent = dataclasses.replace(claimed, attempts=len(webhooks.RETRY_SCHEDULE_SECONDS) - 1)
        assert any_store.record_webhook(attempt(spent, status, now), A)
        assert any_store.redeliver_webhook(event.id, now)
        [again] = any_store.claim_webhooks(B, now, LEASE_S, 10)
        assert (again.id, again.webhook_id, again.state) == (event.id, event.webhook_id, "pending")
        assert (again.attempts, again.delivered_at) == (0, None)
        assert any_store.webhook_backlog().given_up == 0

    def test_an_unknown_event(self, any_store: store.Store) -> None:
        event = one_event(any_store)
        assert not any_store.redeliver_webhook(event.id + 1000, utils.utcnow())
        assert any_store.webhooks() == [event]


class TestDiscard:
    """discard gives up on a backlog written before a time, but not on what is being sent."""

    def test_old_free_events_are_discarded_and_still_redeliverable(
        self, any_store: store.Store
    ) -> None:
        old, held = one_event(any_store, "video_old"), one_event(any_store, "video_held")
        now = utils.utcnow()
        a_second_before = old.created_at - dt.timedelta(seconds=1)
        assert any_store.discard_webhooks(a_second_before, now) == 0  # none written before it
        claimed = {e.task_id: e for e in any_store.claim_webhooks(A, now, LEASE_S, 10)}
        # The old one's attempt failed (it waits for its retry); the other is being sent.
        assert any_store.record_webhook(attempt(claimed["video_old"], 500, now), A)

        assert any_store.discard_webhooks(now + dt.timedelta(minutes=1), now) == 1
        events = {e.task_id: e for e in any_store.webhooks()}
        assert (events["video_old"].state, events["video_old"].last_error) == (
            "disabled",
            outbox.DISCARDED,
        )
        assert (events["video_held"].state, events["video_held"].lease_owner) == ("pending", A)
        # Discarded on purpose: not counted as given up on, and not sent again unless asked.
        assert any_store.webhook_backlog() == outbox.WebhookBacklog(1, held.created_at, 0)
        assert any_store.claim_webhooks(B, now, LEASE_S, 10) == []
        assert any_store.redeliver_webhook(old.id, now)
        assert [e.id for e in any_store.claim_webhooks(B, now, LEASE_S, 10)] == [old.id]

    def test_an_event_written_at_the_cut_off_is_kept(self, any_store: store.Store) -> None:
        """An event written at the cut-off itself is kept: "before" is strictly before."""
        event = one_event(any_store)
        assert any_store.discard_webhooks(event.created_at, utils.utcnow()) == 0
        assert [e.state for e in any_store.webhooks()] == ["pending"]


class TestPausedEndpoints:
    """A URL paused by a 410 Gone gets no event claimed for it until it is resumed."""

    def test_pause_holds_claims_for_that_url_only(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "failed")
        now = utils.utcnow()
        assert any_store.pause_webhook_endpoint(GONE_URL, webhooks.PAUSED_REASON, now)
        assert not any_store.pause_webhook_endpoint(GONE_URL, "again", now)  # paused already
        [paused] = any_store.paused_webhook_endpoints()
        assert (paused.url, paused.reason) == (GONE_URL, webhooks.PAUSED_REASON)
        assert abs((paused.paused_at - now).total_seconds()) < 1
        assert any_store.claim_webhooks(OWNER, now, LEASE_S, 10, GONE_URL) == []
        assert any_store.webhook_backlog().paused_endpoints == 1
        [other] = any_store.claim_webhooks(OWNER, now, LEASE_S, 10, OTHER_URL)
        assert any_store.release_webhooks(OWNER) == 1

        assert any_store.resume_webhook_endpoints(OTHER_URL) == []
        assert any_store.resume_webhook_endpoints(GONE_URL) == [GONE_URL]
        assert any_store.paused_webhook_endpoints() == []
        assert any_store.webhook_backlog().paused_endpoints == 0
        [again] = any_store.claim_webhooks(OWNER, now, LEASE_S, 10, GONE_URL)
        assert again.webhook_id == other.webhook_id

    def test_resume_without_a_url_resumes_every_one(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        assert any_store.resume_webhook_endpoints() == []
        any_store.pause_webhook_endpoint(OTHER_URL, "gone", now)
        any_store.pause_webhook_endpoint(GONE_URL, "gone", now)
        assert any_store.resume_webhook_endpoints() == [GONE_URL, OTHER_URL]
        assert any_store.paused_webhook_endpoints() == []


class TestPrune:
    """prune deletes finished rows with their events; with webhooks on, never an undelivered one."""

    def test_events_go_with_their_rows(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "failed")
        finish(any_store, "video_live", "polling")
        assert any_store.prune(utils.utcnow() + dt.timedelta(days=1)) == 1
        assert any_store.webhooks() == []
        assert [t.task_id for t in any_store.list()] == ["video_live"]

    def test_rows_finished_since_are_kept(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "failed")
        assert any_store.prune(utils.utcnow() - dt.timedelta(days=1)) == 0
        assert len(any_store.webhooks()) == 1

    def test_with_webhooks_on_rows_wait_for_their_events(self, any_store: store.Store) -> None:
        later = utils.utcnow() + dt.timedelta(days=1)
        for task_id in ("video_pending", "video_delivered", "video_failed", "video_gone"):
            finish(any_store, task_id, "archived")
        outcomes = {
            "video_delivered": models.Delivery.DELIVERED,
            "video_failed": models.Delivery.FAILED,
            "video_gone": models.Delivery.DISABLED,
        }
        events = any_store.claim_webhooks(OWNER, utils.utcnow(), LEASE_S, 10)
        any_store.record_webhooks(
            [
                dataclasses.replace(e, state=outcomes[e.task_id].value)
                for e in events
                if e.task_id in outcomes
            ],
            OWNER,
        )
        any_store.release_webhooks(OWNER)
        assert any_store.prune(later, keep_undelivered=True) == 2
        left = {e.task_id: e.state for e in any_store.webhooks()}
        assert left == {"video_pending": "pending", "video_failed": "failed"}
        assert any_store.get("video_pending") is not None and any_store.get("video_failed")
        assert any_store.get("video_delivered") is None and any_store.get("video_gone") is None
