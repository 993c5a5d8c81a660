"""Seedance on Replicate (``bytedance/seedance-1-pro``, ``-1-lite``, ``-2.0``): predictions, kept an hour.

``GET {base}/v1/predictions/{id}`` with ``Authorization: Bearer <token>``. A prediction moves
``starting -> processing -> succeeded | failed | canceled`` (or ``aborted``, ended before it ran).
Replicate deletes a prediction's inputs, outputs and logs **one hour** after it finishes (for
predictions made through the API) and then answers ``data_removed: true``, with no output. Its
answer maps onto our typed result:

========================  =======================================================================
Replicate                 ours
========================  =======================================================================
``starting``              ``queued``
``processing``            ``processing``
``succeeded``             ``completed``, ``video_url`` from ``output`` (a URL, or the video of a
                          list of them)
``failed``                ``failed``, ``error`` as given
``canceled``              ``cancelled``
``aborted``               ``failed``, reason :data:`ABORTED_REASON`
``created_at``            ``created``
``model``                 ``model`` (``bytedance/seedance-1-pro``)
``input.resolution``      ``resolution`` (what was asked for: ``480p``, ``720p``, ``1080p``)
``input.duration``        ``actual_duration`` (the length asked for)
``completed_at`` + 1 h    the deadline (``expires_at``)
``data_removed: true``    gone: ``expired`` with :data:`REMOVED_REASON`, unless the archive holds it
========================  =======================================================================

Output links (``replicate.delivery``) need no key. A 429 says when to come back in its body
(``retry_after``) where no ``Retry-After`` header does. Webhooks are signed by the Standard Webhooks
scheme with the account's ``whsec_`` secret (``GET /v1/webhooks/default/secret``): they are checked
with SEEDANCE_REPLICATE_WEBHOOK_SECRET at ``POST /callbacks/replicate``, and the poll they hasten is
the truth. Only ``id``, ``status`` and a finished prediction's ``output`` must follow the contract;
the rest is read leniently, and ``logs``, ``urls``, ``version``, ``metrics`` and every ``input``
but its ``resolution`` and ``duration`` not at all. With the resolution the fewer-polls policy
applies: no poll before the seed's shortest time for it, then the times learned per model.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import standardwebhooks

from seedance_archiver import errors, models, provider, utils
from seedance_archiver.providers import fields, http

NAME = "replicate"
DEFAULT_BASE_URL = "https://api.replicate.com"
PREDICTIONS_PATH = "/v1/predictions/"
# Replicate's ids are 26 lowercase letters and digits; a few more or fewer are let through, so that
# a longer id Replicate may issue one day is polled, not refused by us.
ID_PATTERN = re.compile(r"[a-z0-9]{16,64}")
ID_RULE = "invalid task id for Replicate: a prediction id is lowercase letters and digits"
# How long Replicate keeps an API prediction's data after it finishes.
DATA_LIFETIME = dt.timedelta(hours=1)
ABORTED_REASON = "aborted at the provider before it ran"
REMOVED_REASON = (
    "the provider removed the prediction's data (data_removed), which it does an hour after "
    "the prediction finished"
)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")
RETRY_AFTER_MAX_SECONDS = 3600.0
RESOLUTION_MAX_CHARS = 100  # a short word (``720p``), never a blob

STATUSES = {
    "starting": models.Status.QUEUED,
    "processing": models.Status.PROCESSING,
    "succeeded": models.Status.COMPLETED,
    "failed": models.Status.FAILED,
    "canceled": models.Status.CANCELLED,
    "aborted": models.Status.FAILED,
}


def parse_answer(task_id: str, body: bytes) -> models.Answer:
    """Parse a prediction for ``task_id``: strict where a video depends on it, lenient elsewhere."""
    payload = fields.json_object(body)
    answer_id = fields.answer_id(payload, task_id)
    raw_status = fields.status_text(payload)
    status = STATUSES.get(raw_status)
    if status is None:
        raise fields.unknown_status(raw_status)
    read = fields.Lenient()
    asked = read.object(payload, "input")
    removed = _removed(payload, read)
    video_url = gone = expires_at = None
    if status is models.Status.COMPLETED:
        video_url = video_link(payload)
        if not video_url and removed:
            gone = REMOVED_REASON
        completed = read.time(payload, "completed_at")
        if completed is not None:
            expires_at = completed + DATA_LIFETIME
    error = read.reason(payload, "error")
    if raw_status == "aborted":
        error = ABORTED_REASON if error is None else f"{ABORTED_REASON}: {error}"
    return models.Answer(
        id=answer_id,
        status=status,
        created=read.time(payload, "created_at"),
        model=read.text(payload, "model", fields.MODEL_MAX_CHARS),
        video_url=video_url,
        # Replicate states no length of its own: the one asked for, which Seedance's videos have.
        actual_duration=read.number(asked, "duration"),
        error=error,
        # What was asked for: the skip and the learned generation times go by it, as for Ark's.
        resolution=read.text(asked, "resolution", RESOLUTION_MAX_CHARS),
        expires_at=expires_at,
        ignored=tuple(read.ignored),
        gone=gone,
    )


def video_link(payload: dict[str, Any]) -> str | None:
    """The video of ``output``: a URL, or among a list of them the first whose path ends like a
    video (else the first); MalformedAnswer for anything else."""
    output = payload.get("output")
    if isinstance(output, list):
        links = [item for item in output if isinstance(item, str) and item]
        if len(links) != len(output):
            raise errors.MalformedAnswer(
                "malformed answer: field 'output' should be a URL or a list of URLs"
            )
        if not links:
            return None
        videos = [
            u for u in links if urllib.parse.urlsplit(u).path.lower().endswith(VIDEO_SUFFIXES)
        ]
        output = (videos or links)[0]
    return fields.link({"output": output}, "output")


def _removed(payload: dict[str, Any], read: fields.Lenient) -> bool:
    """``data_removed`` is true: only the JSON ``true`` counts (anything else is noted, not
    believed: the word that a video is gone must be unambiguous)."""
    value = payload.get("data_removed")
    if value is None or isinstance(value, bool):
        return value is True
    read.ignored.append(("data_removed", f"not a boolean ({type(value).__name__})"))
    return False


def is_own_not_found(body: bytes) -> bool:
    """Replicate's errors are problem details (``{"title", "detail", "status"}``); a gateway's 404
    is HTML or empty."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("detail"), str)


def retry_after(header: str | None, body: bytes, now: dt.datetime) -> float | None:
    """Seconds a 429 asks us to wait: the ``Retry-After`` header, else the body's ``retry_after``."""
    from_header = utils.parse_retry_after(header, now)
    if from_header is not None:
        return from_header
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    wait = payload.get("retry_after") if isinstance(payload, dict) else None
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
        return None
    return min(float(wait), RETRY_AFTER_MAX_SECONDS)


# --- webhooks ------------------------------------------------------------------------------------


def secret_problem(value: str) -> str | None:
    """Why ``value`` is not a Standard Webhooks signing secret (``whsec_`` and base64), or None."""
    if not value.startswith("whsec_"):
        return "expected the signing secret Replicate gives (whsec_ and base64)"
    try:
        base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return "expected whsec_ followed by base64"
    return None


def signed(secret: str, token: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a webhook carries a valid signature by ``secret`` (and a timestamp within the
    library's five minutes of our clock). The path token plays no part."""
    wanted = ("webhook-id", "webhook-timestamp", "webhook-signature")
    given = {name: headers[name] for name in wanted if name in headers}
    if len(given) != len(wanted):
        return False
    try:
        standardwebhooks.Webhook(secret).verify(body, given)
    except Exception:  # the library raises its own errors, and bare ones on bad input
        return False
    return True


class Replicate(http.Dialect):
    """Replicate's dialect for :class:`http.HttpProvider`."""

    name = NAME
    tasks_path = PREDICTIONS_PATH

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)

    def is_own_not_found(self, body: bytes) -> bool:
        return is_own_not_found(body)

    def retry_after(self, header: str | None, body: bytes, now: dt.datetime) -> float | None:
        return retry_after(header, body, now)

    def task_id_problem(self, task_id: str) -> str | None:
        return None if ID_PATTERN.fullmatch(task_id) else ID_RULE


DIALECT = Replicate()
CALLBACKS = provider.Callbacks(
    secret=provider.Secret(
        name="replicate_webhook_secret",
        credential="seedance-replicate-webhook-secret",
        problem=secret_problem,
        what="webhooks are checked with the account's signing secret "
        "(GET https://api.replicate.com/v1/webhooks/default/secret)",
    ),
    authentic=signed,
    task_id=fields.callback_id,
)
PROVIDER = provider.Spec(
    name=NAME,
    default_base_url=DEFAULT_BASE_URL,
    build=http.factory(DIALECT),
    callbacks=CALLBACKS,
    video_lifetime=DATA_LIFETIME,
)
