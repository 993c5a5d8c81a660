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
``created_at``            ``created`` (the deadline is created + the retention, 24 h)
``content.video_url``     ``video_url``
``duration``              ``actual_duration``
``resolution``            ``resolution``
========================  =======================================================================

The other documented fields (``updated_at``, ``content.last_frame_url``, ``ratio``,
``framespersecond``, ``seed``, ``usage.completion_tokens``, ``service_tier``, ``draft``,
``execution_expires_after``) are checked for their type, so a changed contract shows as a malformed
answer rather than a silent misreading, and are not stored.
"""

from __future__ import annotations

import json
from typing import Any

from seedance_archiver import models, provider

NAME = "ark"
TASKS_PATH = "/api/v3/contents/generations/tasks/"
# Ark issues ids like ``cgt-20250101…``; this one has no such prefix, so it can never be issued.
KEY_CHECK_TASK_ID = "seedance-archiver-key-check-0"
EXPIRED_REASON = "expired at the provider before it ran"
SHORT_MAX_CHARS = 100  # resolution, ratio, service tier: short words, never a blob

STATUSES = {
    "queued": models.Status.QUEUED,
    "running": models.Status.PROCESSING,
    "succeeded": models.Status.COMPLETED,
    "failed": models.Status.FAILED,
    "cancelled": models.Status.CANCELLED,
    "expired": models.Status.FAILED,
}


def _object(payload: dict[str, Any], key: str) -> dict[str, Any]:
    found: dict[str, Any] | None = provider.field(payload, key, (dict,), "an object")
    return found or {}


def _error_text(payload: dict[str, Any]) -> str | None:
    """The error object as one readable line, ``message (code)``; None when it is null."""
    if payload.get("error") is None:
        return None
    error = _object(payload, "error")
    code = provider.field(error, "code", (str, int), "a string or a number")
    message = provider.field(error, "message", (str,), "a string")
    if not message and code is None:
        return None
    text = message or "no message"
    if code is not None:
        text = f"{text} ({code})"
    return provider.storable(text, provider.ERROR_MAX_CHARS)


def parse_answer(task_id: str, body: bytes) -> models.Answer:
    """Parse Ark's JSON for ``task_id``; anything off its contract is MalformedAnswer.

    As the reseller's parser: strings come out storable, links whole or not at all, ``id`` is the
    asked-for one.
    """
    payload = provider.json_object(body)
    answer_id = provider.answer_id(payload, task_id)
    raw_status = provider.status_text(payload)
    status = STATUSES.get(raw_status)
    if status is None:
        raise provider.unknown_status(raw_status)
    content = _object(payload, "content")
    video_url = provider.link(content, "video_url")
    provider.link(content, "last_frame_url")
    provider.timestamp(payload, "updated_at")
    for key in ("ratio", "service_tier"):
        provider.text(payload, key, SHORT_MAX_CHARS)
    for key in ("framespersecond", "seed", "execution_expires_after"):
        provider.number(payload, key, "a number")
    provider.number(_object(payload, "usage"), "completion_tokens", "a number")
    provider.flag(payload, "draft")
    error = _error_text(payload)
    if raw_status == "expired":
        error = EXPIRED_REASON if error is None else f"{EXPIRED_REASON}: {error}"
    return models.Answer(
        id=answer_id,
        status=status,
        created=provider.timestamp(payload, "created_at"),
        model=provider.text(payload, "model", provider.MODEL_MAX_CHARS),
        video_url=video_url,
        actual_duration=provider.number(payload, "duration", "a number"),
        error=error,
        resolution=provider.text(payload, "resolution", SHORT_MAX_CHARS),
    )


def callback_task_id(body: bytes) -> str | None:
    """The task id a callback is about, or None when the body is not one.

    Ark POSTs the task's state, shaped like the query's answer, to the ``callback_url`` given at
    creation. Callbacks are not signed, so only the id is read: the poll it triggers is the truth.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    task_id = payload.get("id")
    return task_id if isinstance(task_id, str) and task_id else None


class Ark:
    """Ark's dialect for :class:`provider.HttpProvider`."""

    name = NAME
    key_check_task_id = KEY_CHECK_TASK_ID

    def task_path(self, task_id: str) -> str:
        return TASKS_PATH + task_id

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)


DIALECT = Ark()
