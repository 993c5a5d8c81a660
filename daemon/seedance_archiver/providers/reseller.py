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
    """Parse the provider's JSON for ``task_id``.

    Strict where a wrong reading would lose a video: ``id`` must be the asked-for one, ``status`` one
    of the seed's, and a completed task's ``video_url`` whole and usable (else MalformedAnswer). The
    rest is read leniently (:class:`provider.Lenient`): a drifted side field is ignored and noted,
    never a reason not to archive. Strings come out storable.
    """
    payload = provider.json_object(body)
    answer_id = provider.answer_id(payload, task_id)
    raw_status = provider.status_text(payload)
    try:
        status = models.Status(raw_status)
    except ValueError:
        raise provider.unknown_status(raw_status) from None
    video_url = provider.link(payload, "video_url") if status is models.Status.COMPLETED else None
    read = provider.Lenient()
    return models.Answer(
        id=answer_id,
        status=status,
        created=read.time(payload, "created"),
        model=read.text(payload, "model", provider.MODEL_MAX_CHARS),
        video_url=video_url,
        actual_duration=read.number(payload, "actualDuration"),
        error=read.reason(payload, "error"),
        ignored=tuple(read.ignored),
    )


class Reseller:
    """The reseller's dialect for :class:`provider.HttpProvider`."""

    name = NAME
    key_check_task_id = KEY_CHECK_TASK_ID

    def task_path(self, task_id: str) -> str:
        return f"/v1/result/{task_id}"

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)

    def is_own_not_found(self, body: bytes) -> bool:
        return provider.json_error(body)


DIALECT = Reseller()
