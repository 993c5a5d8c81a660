"""ByteDance's own API for Seedance: BytePlus ModelArk and Volcengine Ark.

``GET {base}/api/v3/contents/generations/tasks/{id}`` with the same Bearer key scheme. A task moves
``queued -> running -> succeeded | failed | cancelled``, or ends ``expired`` when it timed out before
it ran. Its answer maps onto our typed result:

========================  =======================================================================
Ark                       ours
========================  =======================================================================
``queued``                ``queued``
``running``               ``processing``
``succeeded``             ``completed``
``failed``                ``failed``, ``error`` from the error object (``message (code)``)
``cancelled``             ``cancelled``
``expired``               ``failed``, reason :data:`EXPIRED_REASON`
``created_at``            ``created``
``content.video_url``     ``video_url``
``duration``              ``actual_duration``
``resolution``            ``resolution``
========================  =======================================================================

The deadline (``expires_at``) is what Ark's own facts say. A finished task's video lives as long as
its signed link, whose query gives its start and lifetime (``X-Tos-Date`` + ``X-Tos-Expires``), else
24 h from ``updated_at`` (its completion). A task still queued or running may wait until
``created_at`` + its ``execution_expires_after`` (48 h by default, for flex tasks), and then its
video lives 24 h. Ark keeps every task 7 days.

Only ``id``, ``status`` and a finished task's ``content.video_url`` must follow the contract; the
other fields are read where they make sense and otherwise ignored (:class:`fields.Lenient`). The
documented fields nothing here needs (``seed``, ``ratio``, ``usage``, ...) are not read at all.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse

from seedance_archiver import models, provider
from seedance_archiver.providers import fields, http

NAME = "ark"
# Volcengine's; BytePlus ModelArk users set https://ark.ap-southeast.bytepluses.com.
DEFAULT_BASE_URL = "https://ark.cn-beijing.volces.com"
TASKS_PATH = "/api/v3/contents/generations/tasks/"
EXPIRED_REASON = "expired at the provider before it ran"
SHORT_MAX_CHARS = 100  # resolution: a short word, never a blob
# Ark's lifetimes: a video 24 h from its generation; a flex task may wait in the queue for its
# execution_expires_after (this by default); every task is kept 7 days.
VIDEO_LIFETIME = dt.timedelta(hours=24)
EXECUTION_EXPIRES_AFTER_SECONDS = 172_800.0
TASK_LIFETIME_SECONDS = 7 * 86_400

STATUSES = {
    "queued": models.Status.QUEUED,
    "running": models.Status.PROCESSING,
    "succeeded": models.Status.COMPLETED,
    "failed": models.Status.FAILED,
    "cancelled": models.Status.CANCELLED,
    "expired": models.Status.FAILED,
}


def parse_answer(task_id: str, body: bytes) -> models.Answer:
    """Parse Ark's JSON for ``task_id``: strict where a video depends on it, lenient elsewhere,
    as the reseller's parser is."""
    payload = fields.json_object(body)
    answer_id = fields.answer_id(payload, task_id)
    raw_status = fields.status_text(payload)
    status = STATUSES.get(raw_status)
    if status is None:
        raise fields.unknown_status(raw_status)
    read = fields.Lenient()
    video_url = None
    if status is models.Status.COMPLETED:
        video_url = fields.link(read.object(payload, "content"), "video_url")
    created = read.time(payload, "created_at")
    error = read.reason(payload, "error")
    if raw_status == "expired":
        error = EXPIRED_REASON if error is None else f"{EXPIRED_REASON}: {error}"
    if status is models.Status.COMPLETED:
        completed = read.time(payload, "updated_at")
        expires_at = link_expiry(video_url) if video_url else None
        if expires_at is None and completed is not None:
            expires_at = completed + VIDEO_LIFETIME
    elif status in (models.Status.QUEUED, models.Status.PROCESSING) and created is not None:
        waits = read.number(payload, "execution_expires_after")
        waits = EXECUTION_EXPIRES_AFTER_SECONDS if waits is None or waits <= 0 else waits
        expires_at = created + dt.timedelta(seconds=min(waits, TASK_LIFETIME_SECONDS))
        expires_at += VIDEO_LIFETIME
    else:
        expires_at = None
    return models.Answer(
        id=answer_id,
        status=status,
        created=created,
        model=read.text(payload, "model", fields.MODEL_MAX_CHARS),
        video_url=video_url,
        actual_duration=read.number(payload, "duration"),
        error=error,
        resolution=read.text(payload, "resolution", SHORT_MAX_CHARS),
        expires_at=expires_at,
        ignored=tuple(read.ignored),
    )


def link_expiry(url: str) -> dt.datetime | None:
    """When a TOS-signed link stops working: ``X-Tos-Date`` + ``X-Tos-Expires`` seconds; None
    when its query does not say."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    try:
        signed = dt.datetime.strptime(query["X-Tos-Date"][0], "%Y%m%dT%H%M%SZ")
        lifetime = int(query["X-Tos-Expires"][0])
    except (KeyError, IndexError, ValueError):
        return None
    if not 0 < lifetime <= TASK_LIFETIME_SECONDS:
        return None
    return signed.replace(tzinfo=dt.UTC) + dt.timedelta(seconds=lifetime)


def callback_task_id(body: bytes) -> str | None:
    """The task id a callback is about, or None when the body is not one.

    Ark POSTs the task's state, shaped like the query's answer, to the ``callback_url`` given at
    creation. Callbacks are not signed, so only the id is read: the poll it triggers is the truth.
    """
    return fields.callback_id(body)


class Ark(http.Dialect):
    """Ark's dialect for :class:`http.HttpProvider`: its own path, the common contract otherwise."""

    name = NAME
    tasks_path = TASKS_PATH

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)


DIALECT = Ark()
# Ark's callbacks are not signed: the URL it is given carries a secret of ours as its last segment.
CALLBACKS = provider.Callbacks(
    secret=provider.Secret(
        name="callback_token",
        credential="seedance-callback-token",
        problem=provider.path_token_problem,
        what="a callback URL without a secret lets anyone who reaches the port steer polling",
    ),
    authentic=provider.path_token_matches,
    task_id=callback_task_id,
)
PROVIDER = provider.Spec(
    name=NAME,
    default_base_url=DEFAULT_BASE_URL,
    build=http.factory(DIALECT),
    callbacks=CALLBACKS,
    video_lifetime=VIDEO_LIFETIME,
)
