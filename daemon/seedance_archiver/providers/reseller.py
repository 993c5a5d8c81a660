"""The reseller's API, the one the seed page documents: ``GET {base}/v1/result/{id}``.

A task moves ``queued -> processing -> completed | failed | cancelled``; the answer's fields already
have our names (``created``, ``video_url``, ``actualDuration``, ``error`` as text). It knows no
deadline of its own: the task and its video live a day from ``created`` (SEEDANCE_RETENTION_SECONDS).
"""

from __future__ import annotations

from seedance_archiver import models, provider
from seedance_archiver.providers import fields, http

NAME = "reseller"
DEFAULT_BASE_URL = "https://zcbservice.aizfw.cn/kyyReactApiServer"
# The task id that ``check_key`` asks about. The provider issues ids like ``video_<hex>`` (seed page),
# so an id without that prefix, with hyphens, can never be issued: the provider answers 404 when it
# accepts the key and 401/403 when it does not, and no task is ever read or created by the check. Only
# unreserved URL characters, so it reaches the provider as written.
KEY_CHECK_TASK_ID = "seedance-archiver-key-check-0"


def parse_answer(task_id: str, body: bytes) -> models.Answer:
    """Parse the provider's JSON for ``task_id``.

    Strict where a wrong reading would lose a video: ``id`` must be the asked-for one, ``status`` one
    of the seed's, and a completed task's ``video_url`` whole and usable (else MalformedAnswer). The
    rest is read leniently (:class:`fields.Lenient`): a drifted side field is ignored and noted,
    never a reason not to archive. Strings come out storable.
    """
    payload = fields.json_object(body)
    answer_id = fields.answer_id(payload, task_id)
    raw_status = fields.status_text(payload)
    try:
        status = models.Status(raw_status)
    except ValueError:
        raise fields.unknown_status(raw_status) from None
    video_url = fields.link(payload, "video_url") if status is models.Status.COMPLETED else None
    read = fields.Lenient()
    return models.Answer(
        id=answer_id,
        status=status,
        created=read.time(payload, "created"),
        model=read.text(payload, "model", fields.MODEL_MAX_CHARS),
        video_url=video_url,
        actual_duration=read.number(payload, "actualDuration"),
        error=read.reason(payload, "error"),
        ignored=tuple(read.ignored),
    )


class Reseller(http.Dialect):
    """The reseller's dialect for :class:`http.HttpProvider`: the common contract, all of it (a GET
    with a Bearer key, its JSON 404, open signed links refused with 403, 404 or 410)."""

    name = NAME
    key_check_task_id = KEY_CHECK_TASK_ID

    def task_path(self, task_id: str) -> str:
        return f"/v1/result/{task_id}"

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)


DIALECT = Reseller()
PROVIDER = provider.Spec(name=NAME, default_base_url=DEFAULT_BASE_URL, build=http.factory(DIALECT))
