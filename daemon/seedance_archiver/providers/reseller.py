"""The reseller's API, the one the seed page documents: ``GET {base}/v1/result/{id}``.

A task moves ``queued -> processing -> completed | failed | cancelled``; the answer's fields already
have our names (``created``, ``video_url``, ``actualDuration``, ``error`` as text).
"""

from __future__ import annotations

from seedance_archiver import models, provider

NAME = "reseller"
# The task id that ``check_key`` asks about. The provider issues ids like ``video_<hex>`` (seed page),
# so an id without that prefix, with hyphens, can never be issued: the provider answers 404 when it
# accepts the key and 401/403 when it does not, and no task is ever read or created by the check. Only
# unreserved URL characters, so it reaches the provider as written.
KEY_CHECK_TASK_ID = "seedance-archiver-key-check-0"


def parse_answer(task_id: str, body: bytes) -> models.Answer:
    """Parse the provider's JSON for ``task_id``; anything off its contract is MalformedAnswer.

    Its strings come out storable: ``model`` and ``error`` through :func:`provider.storable`;
    ``video_url`` whole or not at all (too long, control characters, or not a URL httpx can request
    is malformed); ``id`` is the asked-for one.
    """
    payload = provider.json_object(body)
    answer_id = provider.answer_id(payload, task_id)
    raw_status = provider.status_text(payload)
    try:
        status = models.Status(raw_status)
    except ValueError:
        raise provider.unknown_status(raw_status) from None
    return models.Answer(
        id=answer_id,
        status=status,
        created=provider.timestamp(payload, "created"),
        model=provider.text(payload, "model", provider.MODEL_MAX_CHARS),
        video_url=provider.link(payload, "video_url"),
        actual_duration=provider.number(payload, "actualDuration", "a number"),
        error=provider.text(payload, "error", provider.ERROR_MAX_CHARS),
    )


class Reseller:
    """The reseller's dialect for :class:`provider.HttpProvider`."""

    name = NAME
    key_check_task_id = KEY_CHECK_TASK_ID

    def task_path(self, task_id: str) -> str:
        return f"/v1/result/{task_id}"

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)


DIALECT = Reseller()
