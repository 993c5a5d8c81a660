"""The store's behaviour, once, over every store: the fake, SQLite and PostgreSQL (``any_store``).

Leases on PostgreSQL follow the database's clock, not the ``now`` a call passes, so no test here
moves time past a live lease: a lease that has run out is one taken for 0 seconds, and one still
live is one taken for a minute.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from typing import Any

import pytest
from seedance_archiver import errors, models, store, utils

A, B = "daemon-a", "daemon-b"
SETUP = "contract-setup"
LEASE_S = 60.0
# How far a lease's end may be from the one asked for: PostgreSQL's clock and ours share a host.
CLOCKS_AGREE = dt.timedelta(seconds=30)
CADENCES = {mode.value: models.Cadence(30, 60) for mode in models.Mode}


def ids(tasks: list[models.Task]) -> list[str]:
    return [task.task_id for task in tasks]


def row(any_store: store.Store, task_id: str) -> models.Task:
    task = any_store.get(task_id)
    assert task is not None, task_id
    return task


def close_to(value: dt.datetime | None, expected: dt.datetime) -> bool:
    return value is not None and abs(value - expected) < CLOCKS_AGREE


def is_aware_utc(value: dt.datetime | None) -> bool:
    return value is not None and value.utcoffset() == dt.timedelta(0)


def ago(now: dt.datetime, *, minutes: float = 0, seconds: float = 0) -> dt.datetime:
    return now - dt.timedelta(minutes=minutes, seconds=seconds)


def shaped(
    any_store: store.Store, task_id: str, mode: str = models.Mode.STANDARD.value, **changes: Any
) -> models.Task:
    """A new row of ``task_id`` as a daemon left it: added, claimed, saved with ``changes``."""
    assert any_store.add(task_id, mode)
    claimed = {task.task_id: task for task in any_store.claim_due(SETUP, utils.utcnow(), 60, 1000)}
    assert any_store.save([claimed.pop(task_id).replace(**changes)], SETUP) == 1
    any_store.release(SETUP, claimed)
    return row(any_store, task_id)


class TestAdd:
    """add tracks a task once: a new row is pending, free and due at once."""

    def test_a_new_row_is_pending_free_and_claimable(self, any_store: store.Store) -> None:
        assert any_store.add("video_new", models.Mode.DRAFT.value)
        task = row(any_store, "video_new")
        assert (task.mode, task.state, task.polls, task.attempts) == ("draft", "pending", 0, 0)
        assert task.lease_owner is None and task.lease_expires_at is None
        assert ids(any_store.claim_due(A, utils.utcnow(), LEASE_S, 10)) == ["video_new"]

    def test_add_is_idempotent_and_keeps_the_first_mode(self, any_store: store.Store) -> None:
        assert any_store.add("video_twice", models.Mode.FLEX.value)
        assert not any_store.add("video_twice", models.Mode.DRAFT.value)
        assert [t.mode for t in any_store.list()] == ["flex"]

    def test_an_unknown_mode_is_refused(self, any_store: store.Store) -> None:
        with pytest.raises(errors.StoreError):
            any_store.add("video_bad", "turbo")
        assert any_store.get("video_bad") is None

    def test_an_unknown_task_is_none(self, any_store: store.Store) -> None:
        assert any_store.get("video_nobody") is None


class TestList:
    """list and counts show every row, newest first, by state."""

    def test_newest_first_and_by_state(self, any_store: store.Store) -> None:
        for task_id in ("video_1", "video_2", "video_3"):
            assert any_store.add(task_id)
        shaped(any_store, "video_4", state=models.State.FAILED.value)
        assert ids(any_store.list()) == ["video_4", "video_3", "video_2", "video_1"]
        assert ids(any_store.list(limit=2)) == ["video_4", "video_3"]
        assert ids(any_store.list(state="pending")) == ["video_3", "video_2", "video_1"]
        assert ids(any_store.list(state="failed")) == ["video_4"]

    def test_counts_name_every_state(self, any_store: store.Store) -> None:
        assert any_store.counts() == {state.value: 0 for state in models.State}
        assert any_store.list() == [] and any_store.list(state="expired") == []
        any_store.add("video_1")
        shaped(any_store, "video_2", state=models.State.ARCHIVED.value)
        expected = {state.value: 0 for state in models.State} | {"pending": 1, "archived": 1}
        assert any_store.counts() == expected


class TestClaim:
    """claim_due leases due, active, free rows to one owner, in the claim order."""

    def test_a_due_row_is_claimed_once_and_leased(self, any_store: store.Store) -> None:
        any_store.add("video_due")
        now = utils.utcnow()
        [claimed] = any_store.claim_due(A, now, LEASE_S, 10)
        assert claimed.task_id == "video_due" and claimed.lease_owner == A
        assert claimed.lease_expires_at is not None
        assert abs(claimed.lease_expires_at - (now + dt.timedelta(seconds=LEASE_S))) < CLOCKS_AGREE
        assert row(any_store, "video_due").lease_owner == A
        assert any_store.leased(["video_due", "video_nobody"], now) == {"video_due"}
        assert any_store.claim_due(A, now, LEASE_S, 10) == []
        assert any_store.claim_due(B, now, LEASE_S, 10) == []

    def test_every_active_state_is_claimed_in_one_batch(self, any_store: store.Store) -> None:
        any_store.add("video_pending")
        now = utils.utcnow()
        for state in ("polling", "downloading"):
            shaped(any_store, f"video_{state}", state=state, next_attempt_at=now)
        claimed = any_store.claim_due(A, now, LEASE_S, 100)
        assert sorted(ids(claimed)) == ["video_downloading", "video_pending", "video_polling"]
        for task in claimed:
            assert task.lease_owner == A
            assert close_to(task.lease_expires_at, now + dt.timedelta(seconds=LEASE_S))
            assert row(any_store, task.task_id) == task

    def test_a_live_lease_keeps_other_owners_out(self, any_store: store.Store) -> None:
        any_store.add("video_held")
        now = utils.utcnow()
        assert ids(any_store.claim_due(A, now, LEASE_S, 10)) == ["video_held"]
        later = now + dt.timedelta(seconds=LEASE_S / 2)
        assert any_store.claim_due(B, later, LEASE_S, 10) == []
        assert row(any_store, "video_held").lease_owner == A

    def test_a_lease_that_ran_out_is_taken_over(self, any_store: store.Store) -> None:
        any_store.add("video_lost")
        now = utils.utcnow()
        assert ids(any_store.claim_due(A, now, 0, 10)) == ["video_lost"]
        later = now + dt.timedelta(seconds=1)
        assert any_store.leased(["video_lost"], later) == set()
        [taken] = any_store.claim_due(B, later, LEASE_S, 10)
        assert taken.lease_owner == B
        assert close_to(taken.lease_expires_at, later + dt.timedelta(seconds=LEASE_S))
        # The first owner's late outcome is not written over the second's work.
        assert any_store.save([taken.replace(state="failed")], A) == 0
        assert row(any_store, "video_lost") == taken

    def test_rows_not_yet_due_wait(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        shaped(
            any_store, "video_later", state="polling", next_attempt_at=now + dt.timedelta(hours=1)
        )
        assert any_store.claim_due(A, now, LEASE_S, 10) == []
        later = now + dt.timedelta(hours=2)
        assert ids(any_store.claim_due(A, later, LEASE_S, 10)) == ["video_later"]

    def test_finished_rows_are_never_claimed(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        for state in models.TERMINAL_STATES:
            shaped(any_store, f"video_{state}", state=state.value, next_attempt_at=now)
        assert any_store.claim_due(A, now, LEASE_S, 100) == []
        assert any_store.claim_due(A, now + dt.timedelta(days=30), LEASE_S, 100) == []

    def test_unpolled_first_then_nearest_deadline_then_longest_overdue(
        self, any_store: store.Store
    ) -> None:
        now = utils.utcnow()
        hour = dt.timedelta(hours=1)
        shaped(
            any_store,
            "video_far",
            state="polling",
            expires_at=now + 2 * hour,
            next_attempt_at=ago(now, minutes=50),
        )
        shaped(
            any_store,
            "video_near_b",
            state="polling",
            expires_at=now + hour,
            next_attempt_at=ago(now, minutes=1),
        )
        shaped(
            any_store,
            "video_near_a",
            state="polling",
            expires_at=now + hour,
            next_attempt_at=ago(now, minutes=9),
        )
        shaped(any_store, "video_fresh", next_attempt_at=ago(now, minutes=5))
        shaped(any_store, "video_old", next_attempt_at=ago(now, minutes=30))
        assert any_store.claim_due(A, now, LEASE_S, 0) == []
        assert ids(any_store.claim_due(A, now, LEASE_S, 2)) == ["video_old", "video_fresh"]
        assert ids(any_store.claim_due(A, now, LEASE_S, 10)) == [
            "video_near_a",
            "video_near_b",
            "video_far",
        ]

    def test_states_and_time_narrow_each_claim(self, any_store: store.Store) -> None:
        """What each call passes decides (SqlStore builds the statement once)."""
        now = utils.utcnow()
        soon = now + dt.timedelta(minutes=1)
        shaped(any_store, "video_soon", state="polling", next_attempt_at=soon)
        shaped(any_store, "video_polling", state="polling", next_attempt_at=now)
        shaped(any_store, "video_downloading", state="downloading", next_attempt_at=now)
        claimed = any_store.claim_due(A, now, LEASE_S, 10, states=["downloading"])
        assert ids(claimed) == ["video_downloading"]
        assert ids(any_store.claim_due(A, now, LEASE_S, 10)) == ["video_polling"]
        assert ids(any_store.claim_due(A, soon, LEASE_S, 10)) == ["video_soon"]

    def test_a_row_another_provider_answered_for_is_not_claimed(
        self, any_store: store.Store
    ) -> None:
        any_store.add("video_unstamped")
        now = utils.utcnow()
        shaped(any_store, "video_ark", state="polling", next_attempt_at=now, provider="ark")
        shaped(any_store, "video_ours", state="polling", next_attempt_at=now, provider="reseller")
        claimed = any_store.claim_due(A, now, LEASE_S, 10, provider_name="reseller")
        assert sorted(ids(claimed)) == ["video_ours", "video_unstamped"]
        assert row(any_store, "video_unstamped").provider is None
        assert row(any_store, "video_ark").lease_owner is None
        assert ids(any_store.claim_due(B, now, LEASE_S, 10, None, "ark")) == ["video_ark"]


class TestSave:
    """save writes the daemon's outcome and frees the row, only for the lease's owner."""

    def test_the_owner_writes_and_frees(self, any_store: store.Store) -> None:
        any_store.add("video_work")
        now = utils.utcnow()
        [task] = any_store.claim_due(A, now, LEASE_S, 10)
        later = now + dt.timedelta(minutes=5)
        outcome = task.replace(
            state="polling", polls=1, last_polled_at=now, next_attempt_at=later, model="m1"
        )
        assert any_store.save([outcome], A) == 1
        saved = row(any_store, "video_work")
        assert (saved.state, saved.polls, saved.model) == ("polling", 1, "m1")
        assert saved.last_polled_at == now and saved.next_attempt_at == later
        assert saved.lease_owner is None and saved.lease_expires_at is None

    def test_every_daemon_column_is_written_back_as_it_was(self, any_store: store.Store) -> None:
        any_store.add("video_abc")
        now = utils.utcnow()
        [task] = any_store.claim_due(A, now, LEASE_S, 10)
        done = task.replace(
            state="archived",
            provider_status="completed",
            provider="reseller",
            model="seedance_1_5_pro_720p",
            video_url="https://cdn.example/v.mp4?sig=x",
            actual_duration=5.5,
            error="previous hiccup",
            provider_created_at=now - dt.timedelta(hours=1),
            expires_at=now + dt.timedelta(hours=23),
            updated_at=now,
            next_attempt_at=now + dt.timedelta(days=1),
            last_polled_at=now,
            completed_at=now,
            archived_at=now,
            polls=4,
            attempts=1,
            archive_uri="s3://bucket/videos/video_abc.mp4",
            archive_bytes=123_456_789_012,
            archive_sha256="ab" * 32,
        )
        assert any_store.save([done], A) == 1
        saved = row(any_store, "video_abc")
        assert saved == done.replace(lease_owner=None, lease_expires_at=None)

    def test_times_come_back_as_the_same_instant_in_utc(self, any_store: store.Store) -> None:
        any_store.add("video_abc")
        [task] = any_store.claim_due(A, utils.utcnow(), LEASE_S, 10)
        plus8 = dt.timezone(dt.timedelta(hours=8))
        created = dt.datetime(2026, 3, 1, 20, 15, 30, 123456, tzinfo=plus8)
        completed = dt.datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=dt.UTC)
        outcome = task.replace(
            provider_created_at=created,
            expires_at=created + dt.timedelta(days=1),
            completed_at=completed,
        )
        assert any_store.save([outcome], A) == 1
        saved = row(any_store, "video_abc")
        assert (saved.provider_created_at, saved.completed_at) == (created, completed)
        assert saved.expires_at == created + dt.timedelta(days=1)
        for name in ("provider_created_at", "expires_at", "completed_at", "inserted_at"):
            assert is_aware_utc(getattr(saved, name)), name
        assert saved.provider_created_at is not None and saved.provider_created_at.hour == 12

    def test_a_naive_time_is_refused(self, any_store: store.Store) -> None:
        any_store.add("video_abc")
        naive = dt.datetime(2026, 3, 1, 12, 0, 0)
        with pytest.raises(errors.StoreError, match="naive"):
            any_store.claim_due(A, naive, LEASE_S, 10)

    def test_the_wrong_owner_writes_nothing(self, any_store: store.Store) -> None:
        any_store.add("video_mine")
        [task] = any_store.claim_due(A, utils.utcnow(), LEASE_S, 10)
        assert any_store.save([task.replace(state="failed", polls=9)], B) == 0
        assert row(any_store, "video_mine") == task

    def test_a_batch_writes_only_the_owners_rows(self, any_store: store.Store) -> None:
        for task_id in ("video_a1", "video_a2", "video_b1"):
            any_store.add(task_id)
        now = utils.utcnow()
        mine = any_store.claim_due(A, now, LEASE_S, 2)
        [theirs] = any_store.claim_due(B, now, LEASE_S, 2)
        batch = [task.replace(state="polling", polls=1) for task in [*mine, theirs]]
        assert any_store.save(batch, A) == 2
        for task in mine:
            saved = row(any_store, task.task_id)
            assert (saved.state, saved.polls, saved.lease_owner) == ("polling", 1, None)
        assert row(any_store, theirs.task_id) == theirs

    def test_a_row_nobody_holds_is_not_written(self, any_store: store.Store) -> None:
        any_store.add("video_free")
        assert any_store.save([row(any_store, "video_free").replace(state="failed")], A) == 0
        assert row(any_store, "video_free").state == "pending"

    def test_only_the_daemons_columns_are_written(self, any_store: store.Store) -> None:
        any_store.add("video_fed", models.Mode.FLEX.value)
        [task] = any_store.claim_due(A, utils.utcnow(), LEASE_S, 10)
        moved = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
        assert any_store.save([task.replace(mode="draft", inserted_at=moved, polls=1)], A) == 1
        saved = row(any_store, "video_fed")
        assert saved.polls == 1
        assert (saved.mode, saved.inserted_at) == ("flex", task.inserted_at)


class TestRenewAndRelease:
    """renew extends the owner's own leases; release gives rows back at once."""

    def test_renew_extends_only_the_owners_leases(self, any_store: store.Store) -> None:
        any_store.add("video_b")
        [b_task] = any_store.claim_due(B, utils.utcnow(), LEASE_S, 10)
        any_store.add("video_a")
        assert ids(any_store.claim_due(A, utils.utcnow(), 0, 10)) == ["video_a"]
        now = utils.utcnow()

        assert any_store.renew(A, ["video_a", "video_b", "video_nobody"], now, 600) == {"video_a"}
        assert any_store.renew(A, [], now, 600) == set()
        renewed = row(any_store, "video_a").lease_expires_at
        assert renewed is not None
        assert abs(renewed - (now + dt.timedelta(seconds=600))) < CLOCKS_AGREE
        assert row(any_store, "video_b").lease_expires_at == b_task.lease_expires_at
        # The renewed lease, which had run out, now keeps B out.
        assert any_store.claim_due(B, now + dt.timedelta(seconds=1), LEASE_S, 10) == []

    def test_a_lease_taken_over_is_not_renewed(self, any_store: store.Store) -> None:
        any_store.add("video_gone")
        now = utils.utcnow()
        any_store.claim_due(A, now, 0, 10)
        assert ids(any_store.claim_due(B, now + dt.timedelta(seconds=1), LEASE_S, 10)) == [
            "video_gone"
        ]
        assert any_store.renew(A, ["video_gone"], now, LEASE_S) == set()
        assert row(any_store, "video_gone").lease_owner == B

    def test_release_frees_for_anyone_at_once(self, any_store: store.Store) -> None:
        any_store.add("video_back")
        now = utils.utcnow()
        [task] = any_store.claim_due(A, now, LEASE_S, 10)
        assert any_store.release(A, ["video_back", "video_nobody"]) == 1
        assert any_store.leased(["video_back"], now) == set()
        freed = row(any_store, "video_back")
        assert freed.lease_owner is None and freed.lease_expires_at is None
        assert freed.replace(lease_owner=A, lease_expires_at=task.lease_expires_at) == task
        assert ids(any_store.claim_due(B, now, LEASE_S, 10)) == ["video_back"]

    def test_release_by_another_owner_frees_nothing(self, any_store: store.Store) -> None:
        any_store.add("video_kept")
        now = utils.utcnow()
        [task] = any_store.claim_due(A, now, LEASE_S, 10)
        assert any_store.release(B, ["video_kept"]) == 0
        assert row(any_store, "video_kept") == task
        assert any_store.claim_due(B, now, LEASE_S, 10) == []


class TestRetry:
    """retry puts a finished row back to polling now, never one a daemon holds."""

    def test_a_failed_row_polls_again_keeping_its_history(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        failed = shaped(
            any_store,
            "video_failed",
            state="failed",
            polls=7,
            attempts=3,
            error="link refused",
            last_polled_at=now - dt.timedelta(hours=2),
            next_attempt_at=now + dt.timedelta(days=10),
        )
        assert any_store.retry("video_failed", now) is store.RetryOutcome.RETRIED
        again = row(any_store, "video_failed")
        assert (again.state, again.attempts, again.next_attempt_at) == ("polling", 0, now)
        assert (again.polls, again.error) == (failed.polls, failed.error)
        assert again.last_polled_at == failed.last_polled_at
        assert ids(any_store.claim_due(A, now, LEASE_S, 10)) == ["video_failed"]

    def test_an_archived_row_only_when_forced(self, any_store: store.Store) -> None:
        shaped(any_store, "video_safe", state="archived")
        now = utils.utcnow()
        assert any_store.retry("video_safe", now) is store.RetryOutcome.ARCHIVED
        assert row(any_store, "video_safe").state == "archived"
        assert any_store.retry("video_safe", now, force=True) is store.RetryOutcome.RETRIED
        assert row(any_store, "video_safe").state == "polling"

    def test_a_held_row_is_left_alone_even_forced(self, any_store: store.Store) -> None:
        any_store.add("video_busy")
        now = utils.utcnow()
        any_store.claim_due(A, now, LEASE_S, 10)
        for force in (False, True):
            assert any_store.retry("video_busy", now, force=force) is store.RetryOutcome.LEASED
        assert row(any_store, "video_busy").lease_owner == A

    def test_a_row_whose_lease_ran_out_is_retried(self, any_store: store.Store) -> None:
        any_store.add("video_dropped")
        now = utils.utcnow()
        any_store.claim_due(A, now, 0, 10)
        later = now + dt.timedelta(seconds=1)
        assert any_store.retry("video_dropped", later) is store.RetryOutcome.RETRIED
        again = row(any_store, "video_dropped")
        assert (again.state, again.lease_owner, again.lease_expires_at) == ("polling", None, None)

    def test_an_unknown_task(self, any_store: store.Store) -> None:
        outcome = any_store.retry("video_nobody", utils.utcnow())
        assert outcome is store.RetryOutcome.NO_SUCH_TASK


class TestHasten:
    """hasten makes free rows of this provider due sooner, never sooner than their cadence."""

    def test_free_rows_move_held_and_foreign_ones_do_not(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        later = now + dt.timedelta(hours=1)
        shaped(any_store, "video_held", state="polling", next_attempt_at=later)
        assert ids(any_store.claim_due(B, later, LEASE_S, 10)) == ["video_held"]
        shaped(any_store, "video_waiting", state="polling", next_attempt_at=later)
        shaped(any_store, "video_ark", state="polling", next_attempt_at=later, provider="ark")
        shaped(any_store, "video_done", state="archived", next_attempt_at=later)
        every = ["video_waiting", "video_ark", "video_held", "video_done", "video_nobody"]
        assert any_store.hasten(every, now, "reseller", CADENCES) == 1
        assert row(any_store, "video_waiting").next_attempt_at == now
        for task_id in ("video_ark", "video_held", "video_done"):
            assert row(any_store, task_id).next_attempt_at == later

    def test_no_sooner_than_the_cadence_after_the_last_poll(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        polled = now - dt.timedelta(seconds=10)
        shaped(
            any_store,
            "video_polled",
            state="polling",
            last_polled_at=polled,
            next_attempt_at=now + dt.timedelta(hours=1),
        )
        assert any_store.hasten(["video_polled"], now, "reseller", CADENCES) == 1
        assert row(any_store, "video_polled").next_attempt_at == polled + dt.timedelta(seconds=30)
        # Already as soon as the cadence allows: nothing moves.
        assert any_store.hasten(["video_polled"], now, "reseller", CADENCES) == 0


class TestFewerPolls:
    """The store's side of fewer polls: observed generation times, starving rows, the load count."""

    def test_generation_times_per_model_latest_first_and_bounded(
        self, any_store: store.Store
    ) -> None:
        now = utils.utcnow()
        created = now - dt.timedelta(hours=2)
        p720, p480 = "seedance_1_5_pro_720p", "seedance_1_5_pro_480p"

        def generated(task_id: str, state: str, model: str, at: dt.datetime, took: float) -> None:
            took_until = at + dt.timedelta(seconds=took)
            shaped(
                any_store,
                task_id,
                state=state,
                model=model,
                provider_created_at=at,
                completed_at=took_until,
            )

        for i in range(5):
            generated(f"video_a{i}", "archived", p720, created, 100 + 61 * i)
        generated("video_b", "downloading", p480, created, 45)
        shaped(any_store, "video_not_done", state="polling", model="m", provider_created_at=created)
        generated("video_too_old", "archived", p480, created - dt.timedelta(days=3), 10)

        times = any_store.generation_times(now - dt.timedelta(days=1), 3)

        assert set(times) == {p720, p480}
        assert sorted(times[p720]) == pytest.approx([222, 283, 344])
        assert times[p480] == pytest.approx([45])

    def test_a_claim_says_which_rows_it_took_from_a_lease_that_ran_out(
        self, any_store: store.Store
    ) -> None:
        """A row its holder let go (saved, released) or never held is claimed plain; one whose
        lease ran out is taken over: its holder died or lost it mid-work, and may have archived
        the video without saying so. Not a column: the row read back is the claimed one."""
        for task_id in ("video_saved", "video_released", "video_ran_out"):
            any_store.add(task_id)
        now = utils.utcnow()
        held = {task.task_id: task for task in any_store.claim_due(A, now, 0, 10)}
        assert [task.taken_over for task in held.values()] == [False] * 3
        assert any_store.save([held["video_saved"].replace(next_attempt_at=now)], A) == 1
        assert any_store.release(A, ["video_released"]) == 1
        any_store.add("video_new")
        later = now + dt.timedelta(seconds=1)

        claimed = any_store.claim_due(B, later, LEASE_S, 10)

        assert {task.task_id: task.taken_over for task in claimed} == {
            "video_saved": False,
            "video_released": False,
            "video_ran_out": True,
            "video_new": False,
        }
        for task in claimed:
            assert row(any_store, task.task_id) == task
            assert not row(any_store, task.task_id).taken_over

    def test_claim_overdue_says_which_rows_it_took_over_too(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        shaped(any_store, "std-ran-out", state="polling", next_attempt_at=ago(now, seconds=400))
        shaped(any_store, "std-free", state="polling", next_attempt_at=ago(now, seconds=300))
        assert ids(any_store.claim_due(A, now, 0, 1)) == ["std-ran-out"]
        later = now + dt.timedelta(seconds=1)
        claimed = any_store.claim_overdue(B, later, LEASE_S, 10, {"standard": ago(now, seconds=60)})
        assert [(task.task_id, task.taken_over) for task in claimed] == [
            ("std-ran-out", True),
            ("std-free", False),
        ]

    def test_claim_overdue_takes_the_longest_overdue_of_each_mode(
        self, any_store: store.Store
    ) -> None:
        now = utils.utcnow()
        shaped(any_store, "std-late", state="polling", next_attempt_at=ago(now, seconds=300))
        shaped(any_store, "std-later", next_attempt_at=ago(now, seconds=900))
        shaped(any_store, "std-ok", state="polling", next_attempt_at=ago(now, seconds=30))
        shaped(
            any_store, "draft-late", "draft", state="polling", next_attempt_at=ago(now, seconds=40)
        )
        shaped(any_store, "dl", state="downloading", next_attempt_at=ago(now, seconds=900))
        shaped(any_store, "done", state="archived", next_attempt_at=ago(now, seconds=900))
        due_before = {
            "standard": ago(now, seconds=60),
            "draft": ago(now, seconds=20),
            "flex": ago(now, seconds=120),
        }

        claimed = any_store.claim_overdue(A, now, LEASE_S, 10, due_before)

        assert ids(claimed) == ["std-later", "std-late", "draft-late"]
        assert all(t.lease_owner == A for t in claimed)
        assert any_store.claim_overdue(B, now, LEASE_S, 10, due_before) == []
        assert sorted(ids(any_store.claim_due(B, now, LEASE_S, 10))) == ["dl", "std-ok"]

    def test_summary_counts_rows_due_within_the_load_window(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        shaped(any_store, "overdue", state="polling", next_attempt_at=now - dt.timedelta(hours=1))
        shaped(any_store, "soon", next_attempt_at=now + store.LOAD_WINDOW / 2)
        shaped(any_store, "later", state="polling", next_attempt_at=now + store.LOAD_WINDOW * 2)
        shaped(any_store, "dl", state="downloading", next_attempt_at=now)
        shaped(any_store, "done", state="archived", next_attempt_at=now)
        assert any_store.summary(now).due_soon == 2


class TestWaitingOnSettings:
    """Rows one of our settings refuses: counted, and due at once when a daemon starts."""

    WAITING = (
        models.WAITING_ON_SETTING + ": video is 3000000 bytes, more than SEEDANCE_MAX_VIDEO_BYTES"
    )

    def test_woken_counted_and_nothing_else_touched(self, any_store: store.Store) -> None:
        later = utils.utcnow() + dt.timedelta(hours=1)
        waiting: dict[str, Any] = {
            "state": "downloading",
            "error": self.WAITING,
            "next_attempt_at": later,
        }
        shaped(any_store, "video_waits", provider="reseller", **waiting)
        shaped(any_store, "video_other_provider", provider="ark", **waiting)
        shaped(
            any_store,
            "video_retrying",
            state="downloading",
            error="the video host answered HTTP 503 (attempt 1; next try in 5s)",
            next_attempt_at=later,
        )
        shaped(
            any_store, "video_polling", state="polling", error=self.WAITING, next_attempt_at=later
        )
        assert any_store.summary(utils.utcnow()).waiting_on_setting == 2
        now = utils.utcnow()
        assert any_store.wake_waiting_on_settings(now, "reseller") == 1
        assert any_store.wake_waiting_on_settings(now, "reseller") == 0  # due already
        assert ids(any_store.claim_due(A, now, LEASE_S, 100)) == ["video_waits"]

    def test_a_leased_row_is_left_alone(self, any_store: store.Store) -> None:
        later = utils.utcnow() + dt.timedelta(hours=1)
        shaped(
            any_store, "video_waits", state="downloading", error=self.WAITING, next_attempt_at=later
        )
        [held] = any_store.claim_due(A, later, LEASE_S, 10)
        assert any_store.wake_waiting_on_settings(utils.utcnow(), "reseller") == 0
        assert row(any_store, "video_waits") == held


def beat(owner: str, last_tick_at: dt.datetime | None, api_key_ok: bool = True) -> store.DaemonBeat:
    started = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
    return store.DaemonBeat(owner, "host-1", 4242, "1.0.0", started, last_tick_at, api_key_ok)


class TestHeartbeats:
    """Each daemon's heartbeat: written, then updated in place, listed latest tick first, forgotten."""

    def test_a_beat_is_written_then_updated(self, any_store: store.Store) -> None:
        assert any_store.daemons() == []
        ticked = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
        any_store.beat(beat(A, None))
        assert any_store.daemons() == [beat(A, None)]
        any_store.beat(beat(A, ticked, api_key_ok=False))
        assert any_store.daemons() == [beat(A, ticked, api_key_ok=False)]

    def test_beats_at_once_are_one_row(self, any_store: store.Store) -> None:
        """The first tick's beat and the scheduled one may run at once, each in its thread."""
        ticked = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for round_ in range(20):
                owner = f"daemon-{round_}"
                beats = [beat(owner, None if n % 2 else ticked) for n in range(4)]
                list(pool.map(any_store.beat, beats))  # raises what any beat raised
        assert len(any_store.daemons()) == 20

    def test_latest_tick_first_and_forgotten_on_stop(self, any_store: store.Store) -> None:
        ticked = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
        any_store.beat(beat(A, ticked))
        any_store.beat(beat(B, ticked + dt.timedelta(seconds=5)))
        assert [d.owner for d in any_store.daemons()] == [B, A]
        any_store.forget_daemon(B)
        any_store.forget_daemon("daemon-nobody")
        assert [d.owner for d in any_store.daemons()] == [A]

    def test_one_not_yet_ticked_comes_last(self, any_store: store.Store) -> None:
        ticked = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
        any_store.beat(beat("daemon-starting", None))
        any_store.beat(beat(A, ticked))
        assert [d.owner for d in any_store.daemons()] == [A, "daemon-starting"]
